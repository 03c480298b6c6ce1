import os
import sys

# `python -m trainval` puts the current folder first on sys.path, so a tqdm.py or sklearn.py lying there
# (an unpacked run bundle, say) would run in place of the real one. trainval imports from the current
# folder only a module its config names, and then after the installed packages (data.import_object).
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from trainval.app.cli import main  # noqa: E402

sys.exit(main())
