"""What a per-group function pays to pandas itself, on small groups.

The workloads' fit (``_common.fit``) selects 5 feature columns with
``df[FEATURES].to_numpy()`` and solves a least-squares problem. On groups of
50 or 500 rows most of its time is pandas' column selection, not the
solve; this prints each piece, and the same fit with the columns taken one
by one, in microseconds per call (the best of 7 repeats of 500 calls, on
one group of a workload's data). Run:

    python benchmarks/bench_group_function.py
"""

from __future__ import annotations

import timeit

import numpy as np
import pandas as pd
from _common import FEATURES, fit, make_chunk


def fit_column_by_column(df: pd.DataFrame) -> np.ndarray:
    """The same fit, with the feature matrix built from one column at a time."""
    x = np.column_stack([df[column].to_numpy(dtype=np.float64) for column in FEATURES])
    weights, *_ = np.linalg.lstsq(x, df["y"].to_numpy(dtype=np.float64), rcond=None)
    return weights


PIECES = {
    "the workloads' fit": fit,
    "  df[FEATURES].to_numpy()": lambda df: df[FEATURES].to_numpy(dtype=np.float64),
    "  df['y'].to_numpy()": lambda df: df["y"].to_numpy(dtype=np.float64),
    "  np.linalg.lstsq on the arrays": None,  # filled per group: the arrays are made beforehand
    "df.loc[:, FEATURES].to_numpy()": lambda df: df.loc[:, FEATURES].to_numpy(dtype=np.float64),
    "np.column_stack of df[column].to_numpy()": lambda df: np.column_stack(
        [df[column].to_numpy(dtype=np.float64) for column in FEATURES]
    ),
    "the fit, column by column": fit_column_by_column,
}


def microseconds(call, number: int = 500, repeat: int = 7) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    sizes = (50, 500)  # W1's and W2's rows per group
    groups = {}
    for rows in sizes:
        # a group as a run hands it over: a slice of a partition of 200 groups
        frame = make_chunk(np.arange(200), np.full(200, rows), 0)
        groups[rows] = frame.iloc[rows : 2 * rows]
    print(f"pandas {pd.__version__}, numpy {np.__version__}; microseconds per call")
    print(f"{'piece':<44}" + "".join(f"{f'{rows} rows':>12}" for rows in sizes))
    for name, piece in PIECES.items():
        cells = []
        for rows in sizes:
            group = groups[rows]
            if piece is None:
                x, y = group[FEATURES].to_numpy(dtype=np.float64), group["y"].to_numpy(dtype=np.float64)
                cells.append(microseconds(lambda: np.linalg.lstsq(x, y, rcond=None)))
            else:
                cells.append(microseconds(lambda: piece(group)))
        print(f"{name:<44}" + "".join(f"{cell:>12.1f}" for cell in cells))


if __name__ == "__main__":
    main()
