"""The two training recipes, read top to bottom: config -> Accelerator -> run folder -> tracker -> train -> report.

``accelerate launch launch/embed.py`` and ``launch/classify.py`` run their ``main``; so does
``toolkit demo``, in-process, from an installed package.
"""
