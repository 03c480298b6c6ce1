"""scikit-learn's bundled diabetes data (442 patients, 10 features, no download) as a regression CSV.

The two target columns are disease progression after one year (divided by 100) and, as a second output
to show multi-output regression, the body-mass index column (which is then not a feature).

    python examples/make_regression_csv.py [--out examples/data/diabetes.csv]
"""

from __future__ import annotations

import argparse
import csv
import os

from sklearn.datasets import load_diabetes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "diabetes.csv"))
    args = ap.parse_args()
    d = load_diabetes(scaled=True)
    names = list(d.feature_names)  # age, sex, bmi, bp, s1..s6
    bmi = names.index("bmi")
    features = [n for n in names if n != "bmi"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(features + ["progression", "bmi"])
        for row, target in zip(d.data, d.target):
            w.writerow([f"{row[i]:.6f}" for i in range(len(names)) if i != bmi]
                       + [f"{target / 100:.4f}", f"{row[bmi] * 10:.6f}"])
    print(f"wrote {len(d.target)} rows to {args.out}")


if __name__ == "__main__":
    main()
