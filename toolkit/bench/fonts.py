"""``toolkit bench fonts``: the fonts of the hard character benchmark, listed or installed.

The easy character folder draws from whatever fonts a fresh machine has (DejaVu: a few
faces of one design). The hard one (``toolkit bench accuracy``) draws from about 150 fonts
of 80-odd families, a third of them handwriting, brush and marker styles, installed from
Debian's packages by ``toolkit bench fonts --install`` (root, or sudo; about 60 MB). Nothing
here downloads at run time: the package list below is fixed, and apt-get fetches it from the
distribution's own archive.

Without ``--install`` it prints what is usable now: fonts under ``/usr/share/fonts`` that
draw all 62 characters distinctly, at most ``--per_family`` faces per family (``--font_root``
another folder: macOS keeps its fonts in /Library/Fonts, say).
"""
from __future__ import annotations

import os
import shutil
import subprocess

from toolkit.bench import log, require_ints
from toolkit.errors import ConfigError

# Handwriting, brush, marker and other informal styles first: they are what makes the set
# hard (and close to handwritten characters); the rest add print, mono and display designs.
HANDWRITING_PACKAGES = (
    "fonts-comic-neue", "fonts-dkg-handwriting", "fonts-breip", "fonts-bwht", "fonts-dancingscript",
    "fonts-ecolier-court", "fonts-ecolier-lignes-court", "fonts-femkeklaver", "fonts-humor-sans",
    "fonts-kaushanscript", "fonts-kristi", "fonts-leckerli-one", "fonts-lobster", "fonts-lobstertwo",
    "fonts-levien-typoscript", "fonts-joscelyn", "fonts-havana", "fonts-isabella", "fonts-rufscript",
    "fonts-staypuft", "fonts-cabinsketch", "fonts-sjfonts", "fonts-georgewilliams", "fonts-dustin",
    "fonts-essays1743", "fonts-averia-gwf", "fonts-averia-sans-gwf", "fonts-averia-serif-gwf", "fonts-komatuna",
    "fonts-cherrybomb", "fonts-rocknroll", "fonts-opendyslexic", "fonts-sil-andika", "fonts-klee",
    "fonts-yusei-magic", "fonts-summersby", "fonts-fantasma", "fonts-oflb-euterpe", "fonts-gnutypewriter",
)
PRINT_PACKAGES = (
    "fonts-liberation2", "fonts-freefont-ttf", "fonts-crosextra-carlito", "fonts-crosextra-caladea",
    "fonts-open-sans", "fonts-roboto-unhinted", "fonts-lato", "fonts-go", "fonts-inconsolata", "fonts-dejavu-extra",
    "fonts-cantarell", "fonts-comfortaa", "fonts-quicksand", "fonts-karla", "fonts-cabin", "fonts-dosis",
    "fonts-play", "fonts-oxygen", "fonts-ebgaramond", "fonts-linuxlibertine", "fonts-vollkorn", "fonts-urw-base35",
    "fonts-texgyre", "fonts-courier-prime", "fonts-b612", "fonts-jura", "fonts-tuffy", "fonts-yanone-kaffeesatz",
    "fonts-sil-gentium", "fonts-sil-charis", "fonts-oldstandard", "fonts-junicode", "fonts-cmu", "fonts-fanwood",
    "fonts-goudybookletter", "fonts-prociono", "fonts-ocr-b", "fonts-national-park", "fonts-league-spartan",
    "fonts-inter", "fonts-mononoki", "fonts-hack", "fonts-firacode", "fonts-anonymous-pro", "fonts-allerta",
    "fonts-arapey", "fonts-clear-sans", "fonts-manrope", "fonts-sora", "fonts-radisnoir",
)
HARD_FONT_PACKAGES = HANDWRITING_PACKAGES + PRINT_PACKAGES
"""Debian packages of the hard benchmark's fonts (bookworm names)."""

PER_FAMILY = 2  # faces per family in the hard set (Regular and Bold, say; not 38 weights of one design)
MIN_FONTS = 100  # the hard set needs at least this many usable fonts


def apt_get(*args: str) -> list[str]:
    """An apt-get command line, with sudo when not root."""
    return [*([] if os.geteuid() == 0 else ["sudo"]), "apt-get", *args]


def install_command() -> list[str]:
    """The apt-get command that installs :data:`HARD_FONT_PACKAGES`."""
    return apt_get("install", "-y", "--no-install-recommends", *HARD_FONT_PACKAGES)


def hard_fonts(per_family: int = PER_FAMILY, root: str = "") -> list:
    """The fonts the hard set draws from: usable fonts under ``root`` (default /usr/share/fonts),
    ``per_family`` faces per family folder."""
    from toolkit.datasets import discover_fonts

    return discover_fonts(root or None, per_family=per_family)


def require_hard_fonts(per_family: int = PER_FAMILY, root: str = "") -> list:
    """:func:`hard_fonts`, or a one-line ConfigError saying how to install them."""
    fonts = hard_fonts(per_family, root)
    if len(fonts) < MIN_FONTS:
        raise ConfigError(f"the hard character set needs >= {MIN_FONTS} usable fonts, found {len(fonts)} under "
                          f"{root or '/usr/share/fonts'}: run `toolkit bench fonts --install` (Debian/Ubuntu, root "
                          "or sudo), or point --font_root at a folder of fonts")
    return fonts


def main(*, install: bool = False, per_family: int = PER_FAMILY, font_root: str = "") -> dict:
    require_ints("fonts", [("per_family", per_family, 1)])
    if install:
        if shutil.which("apt-get") is None:
            raise ConfigError("toolkit bench fonts --install needs apt-get (Debian/Ubuntu); elsewhere install "
                              "handwriting and other font families by hand into /usr/share/fonts")
        cmd = install_command()
        if cmd[0] == "sudo" and shutil.which("sudo") is None:
            raise ConfigError("toolkit bench fonts --install runs apt-get: run it as root (there is no sudo here)")
        log("running: " + " ".join(cmd[:5]) + f" ... ({len(HARD_FONT_PACKAGES)} packages)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        done = subprocess.run(cmd, env=env)
        if done.returncode:  # a machine that never ran `apt-get update` has no package lists
            subprocess.run(apt_get("update", "-q"), env=env)
            done = subprocess.run(cmd, env=env)
        if done.returncode:
            raise ConfigError(f"apt-get install failed (exit {done.returncode}); the packages are listed in "
                              "toolkit/bench/fonts.py")
    fonts = hard_fonts(per_family, font_root)
    families = sorted({p.parent.name for p in fonts})
    print(f"{len(fonts)} usable fonts from {len(families)} families under {font_root or '/usr/share/fonts'} "
          f"(at most {per_family} faces per family; the hard set needs >= {MIN_FONTS})")
    if len(fonts) < MIN_FONTS and not install:
        print("install them with: toolkit bench fonts --install   (runs: " + " ".join(install_command()[:5]) + " ...)")
    return {"fonts": [str(p) for p in fonts], "families": families}
