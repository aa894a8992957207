"""edgesmith's browser assets (pages, driver, npm lock file), installed as the package ``edgesmith_web``.

Nothing here is Python code: the folder is a package only so that a wheel carries these files
(setup.py maps ``edgesmith_web`` to web/; toolchain/core/webassets.py finds them).
"""
