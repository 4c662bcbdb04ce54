"""List (or with --delete remove) the stage folders that no MLflow run, logged model or the nightly baseline
refers to: `skeleton gc`, see tasks/gc.py."""
import sys

from tasks.gc import main

if __name__ == "__main__":
    sys.exit(main())
