"""Cost of one FVD bootstrap resample: the D x D covariance route against the N x N route that
``eval.fvd.bootstrap_interval`` takes below N = D, side by side on the same features.

    python tests/benchmarks/bench_fvd_bootstrap.py [--dim 400] [--repeats 20]
"""

import argparse
import time

import numpy as np

from eval.fvd import feature_statistics, frechet_distance, frechet_distance_of_samples


def _ms(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=400, help="feature size (I3D logits: 400)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| N per set | covariance route | N x N route |\n|---|---|---|")
    for n in (50, 200):
        real = rng.standard_normal((n, args.dim))
        fake = rng.standard_normal((n, args.dim)) + 0.1
        cov = _ms(lambda: frechet_distance(*feature_statistics(real), *feature_statistics(fake)),
                  args.repeats)
        gram = _ms(lambda: frechet_distance_of_samples(real, fake), args.repeats)
        print(f"| {n} | {cov:.1f} ms | {gram:.1f} ms |")


if __name__ == "__main__":
    main()
