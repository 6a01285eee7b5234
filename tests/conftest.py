import pathlib
import sys

# the scripts live flat at the repository root
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
