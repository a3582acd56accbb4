import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("PL_DISABLE_FORK", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
