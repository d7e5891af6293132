"""The ml_collections configs of `bidirlm train`, shipped inside the package.

They live here, not only in the repository, so that `bidirlm demo` and notebooks work from an installed
package; `configs/*.py` at the repository root re-export them for `bidirlm train --config configs/lm.py:tiny`.
"""
