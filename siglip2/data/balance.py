"""Data balancing with Multi-Modal Moment Matching (M4): a per-key keep table that bounds the
first- and second-order bias of a sensitive attribute in the data a run trains on.

Source: "CLIP the Bias: How Useful is Balancing Data in Multimodal Learning?" (Alabdulmohsin
et al., ICLR 2024, arXiv 2403.04547), the de-biasing SigLIP 2 applies to its mixture [P §2.6].
Each example x carries sensitive-attribute indicators s(x) in {0,1}^m (e.g. perceived gender:
man / woman) and concept indicators y(x) in {0,1}^c (e.g. occupations), read from the sample's
json when the config names a json path, else from the caption by keyword lists (any language).
M4 looks for keep probabilities q(x) in [0, 1] close to a keep rate eta,

    minimise   E[(q(x) - eta)^2] / 2
    subject to |share_k - pi_k|              <= eps_R   for every attribute value k
               |E[(s_k - pi_k) y_r | z = 1]| <= eps_A   for every value k and concept r

where, over the kept examples that carry an attribute (z(x) = 1 when any s_k(x) = 1),
share_k is the fraction with s_k = 1 and pi_k its target (uniform by default). The second
line is the attribute-concept covariance once the shares sit at their targets: within every
concept the attribute's share is pi_k. Both are linear in q once multiplied out
(E[q b_j(x)] <= 0, `constraint_features`), so the problem is a convex QP whose dual is solved
here by accelerated projected gradient ascent, with q(x) = clip(eta - b(x) . lambda, 0, 1):
the paper's primal-dual form. The constraints see an example only through its indicator
pattern (s, y), so one streaming pass counts patterns (memory: one row per distinct pattern)
and the dual is solved on the counts, exactly; examples that carry no attribute are kept at
rate eta. Then each pattern keeps round(n_g q_g) of its examples, chosen by a seeded hash of
their keys, so the kept set's moments are the solution's up to rounding and the table is
reproducible by seed.

Not published (ours, configurable): the tolerances, the per-attributed-example normalisation
of both bounds, keep_rate 1 (keep all that the bounds allow), the keyword matching.
`python -m siglip2.data.balance` writes the table; `data.balance_table=<table>` makes the
training loader drop what it does not keep, counted as ``filtered_balance``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FILTER_REASON = "filtered_balance"  # the loader's skip reason for a sample the table drops


@dataclass
class BalanceConfig:
    """The balancing problem (a yaml, docs/own_data.md "De-biasing your data").

    `attributes`: value -> keywords (e.g. ``{"man": ["man", "men", "homme"], "woman": [...]}``);
    at least two values. `concepts`: concept -> keywords (may be empty: first order only).
    `target`: value -> share among attributed kept examples (None: 1/m each).
    `representation_tolerance` (eps_R) and `association_tolerance` (eps_A): shares, >= 0.
    `keep_rate` (eta, in (0, 1]): what every example is kept at when no bound binds.
    `json_attributes` / `json_concepts`: a path in the sample's json whose value(s) name the
    attribute values / concepts (``"objects[].color"``: every object's color); when the path
    is present in a sample's json it is used instead of the caption's keywords.
    """

    attributes: dict[str, list[str]]
    concepts: dict[str, list[str]] = field(default_factory=dict)
    target: dict[str, float] | None = None
    representation_tolerance: float = 0.01
    association_tolerance: float = 0.01
    keep_rate: float = 1.0
    json_attributes: str | None = None
    json_concepts: str | None = None
    max_iter: int = 20000

    def __post_init__(self):
        if not isinstance(self.attributes, Mapping) or len(self.attributes) < 2:
            raise ValueError(
                f"balance: `attributes` needs at least two values (value -> keywords), got {self.attributes!r}"
            )
        self.attributes = {str(k): [str(w) for w in v] for k, v in self.attributes.items()}
        self.concepts = {str(k): [str(w) for w in v] for k, v in (self.concepts or {}).items()}
        if self.target is None:
            self.target = {k: 1.0 / len(self.attributes) for k in self.attributes}
        if set(self.target) != set(self.attributes) or not all(0.0 <= float(v) <= 1.0 for v in self.target.values()):
            raise ValueError(
                f"balance: `target` must give every attribute value {list(self.attributes)} a share in "
                f"[0, 1], got {self.target}"
            )
        self.target = {k: float(self.target[k]) for k in self.attributes}
        if self.representation_tolerance < 0 or self.association_tolerance < 0:
            raise ValueError("balance: tolerances must be >= 0")
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"balance: keep_rate must lie in (0, 1], got {self.keep_rate}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BalanceConfig":
        import yaml

        from siglip2.config import from_dict

        spec = yaml.safe_load(Path(path).read_text()) or {}
        return from_dict(cls, spec, f"balance config {path}")

    @property
    def values(self) -> list[str]:
        return list(self.attributes)


# ---- indicators ------------------------------------------------------------------------

# Scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, kana, CJK, hangul,
# half-width katakana. A keyword in one of them matches as a substring.
_NO_SPACES = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uff66-\uff9f]")


def _keyword_pattern(words: Iterable[str]) -> re.Pattern:
    """One case-insensitive regex for a keyword list: whole words for scripts with word
    boundaries; a keyword that contains a character of a script written without spaces (Thai,
    Lao, Myanmar, Khmer, kana, CJK, hangul) matches as a substring."""
    parts = []
    for w in words:
        w = w.strip()
        if not w:
            continue
        if re.search(_NO_SPACES, w):
            parts.append(re.escape(w))
        else:
            parts.append(r"(?<!\w)" + re.escape(w) + r"(?!\w)")
    return re.compile("|".join(parts) if parts else r"(?!x)x", re.IGNORECASE)


def _json_values(meta: Any, path: str) -> set[str] | None:
    """Values at a dotted path with ``[]`` for lists (``objects[].color``), lower-cased; None
    when the path is absent from this json. A path that is there but holds nothing (an empty
    ``objects`` list: nobody in the picture) gives an empty set: the json still wins."""
    nodes = [meta]
    for part in path.split("."):
        many = part.endswith("[]")
        name = part[:-2] if many else part
        nxt = []
        found = False
        for node in nodes:
            if not isinstance(node, Mapping) or name not in node:
                continue
            found = True
            v = node[name]
            if many:
                nxt.extend(v if isinstance(v, list) else [v])
            else:
                nxt.append(v)
        if not found:
            return None
        if not nxt:
            return set()
        nodes = nxt
    out: set[str] = set()
    for v in nodes:
        out.update(str(x).lower() for x in (v if isinstance(v, list) else [v]))
    return out


class Indicators:
    """(s, y) of one example from its caption and json, as `BalanceConfig` says."""

    def __init__(self, cfg: BalanceConfig):
        self.cfg = cfg
        self._attr = [_keyword_pattern(w) for w in cfg.attributes.values()]
        self._conc = [_keyword_pattern(w) for w in cfg.concepts.values()]
        self._attr_names = [{k.lower(), *(w.lower() for w in ws)} for k, ws in cfg.attributes.items()]
        self._conc_names = [{k.lower(), *(w.lower() for w in ws)} for k, ws in cfg.concepts.items()]

    def _one(self, caption: str, meta, path, patterns, names) -> tuple[int, ...]:
        found = _json_values(meta, path) if path and meta is not None else None
        if found is not None:
            return tuple(int(bool(n & found)) for n in names)
        return tuple(int(p.search(caption or "") is not None) for p in patterns)

    def __call__(self, caption: str, meta: Mapping | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        s = self._one(caption, meta, self.cfg.json_attributes, self._attr, self._attr_names)
        y = self._one(caption, meta, self.cfg.json_concepts, self._conc, self._conc_names)
        return s, y


# ---- the problem and its solution ---------------------------------------------------------


def constraint_features(patterns: np.ndarray, cfg: BalanceConfig) -> np.ndarray:
    """(G, m + c) 0/1 patterns [s | y] -> (G, J) b with every bound as E[q b_j] <= 0.

    For each value k (z = any s): +-(s_k - pi_k z) - eps_R z (the share), then for each
    concept r: +-(s_k - pi_k z) y_r - eps_A z (the covariance within attributed examples)."""
    m = len(cfg.attributes)
    s, y = patterns[:, :m].astype(np.float64), patterns[:, m:].astype(np.float64)
    z = (s.sum(1) > 0).astype(np.float64)
    pi = np.array([cfg.target[k] for k in cfg.attributes])
    gap = s - pi[None, :] * z[:, None]  # (G, m)
    cols = [gap - cfg.representation_tolerance * z[:, None], -gap - cfg.representation_tolerance * z[:, None]]
    if y.shape[1]:
        assoc = (gap[:, :, None] * y[:, None, :]).reshape(len(patterns), -1)  # (G, m*c), k-major
        cols += [assoc - cfg.association_tolerance * z[:, None], -assoc - cfg.association_tolerance * z[:, None]]
    return np.concatenate(cols, axis=1)


@dataclass
class Solution:
    keep: np.ndarray  # (G,) keep probability per pattern
    dual: np.ndarray  # (J,) lambda
    iterations: int
    max_violation: float  # max_j E[q b_j] / E[z] at the solution (<= 0 when every bound holds)


def solve(patterns: np.ndarray, counts: np.ndarray, cfg: BalanceConfig, tol: float = 1e-7) -> Solution:
    """M4's QP on pattern counts: (G, m+c) 0/1 `patterns` with (G,) `counts` -> keep
    probability per pattern. Dual: lambda >= 0, q(lambda) = clip(eta - B lambda, 0, 1), ascent
    along B^T (w * q) with step 1 / ||B^T W B||_2 and Nesterov momentum (FISTA), restarted when
    the dual stops rising; stops when no bound is violated by more than `tol` (in shares) and
    complementary slackness holds to `tol`, or after `cfg.max_iter` steps (then warns)."""
    counts = np.asarray(counts, dtype=np.float64)
    w = counts / counts.sum()
    B = constraint_features(patterns, cfg)
    eta = cfg.keep_rate
    z_mass = float(w @ (patterns[:, : len(cfg.attributes)].sum(1) > 0)) or 1.0
    L = _largest_eigenvalue(B, w) if B.size else 0.0
    if L <= 0:
        return Solution(np.full(len(w), eta), np.zeros(B.shape[1]), 0, 0.0)
    step = 1.0 / L

    def q_of(lam):
        return np.clip(eta - B @ lam, 0.0, 1.0)

    def dual_value(lam, q):
        return float(w @ (0.5 * (q - eta) ** 2 + q * (B @ lam)))

    lam = np.zeros(B.shape[1])
    mom, t = lam.copy(), 1.0
    prev = -np.inf
    it = 0
    restarted = False
    for it in range(1, cfg.max_iter + 1):  # noqa: B007 (read after the loop: iterations used)
        grad = B.T @ (w * q_of(mom))
        new = np.maximum(mom + step * grad, 0.0)
        q = q_of(new)
        value = dual_value(new, q)
        # restart the momentum when the dual falls (O'Donoghue & Candes); the plain step right
        # after a restart is always taken, so rounding at the optimum cannot stall the loop
        if value < prev - 1e-15 * max(1.0, abs(prev)) and not restarted:
            mom, t, restarted = lam.copy(), 1.0, True
            continue
        restarted = False
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        mom = new + (t - 1) / t_next * (new - lam)
        lam, t, prev = new, t_next, value
        g = B.T @ (w * q) / z_mass
        if g.max() <= tol and float(np.abs(lam * g).max()) <= tol:
            break
    else:
        log.warning(
            "balance: the dual did not converge in %d steps (max bound violation %.2e of the attributed "
            "mass); raise max_iter",
            cfg.max_iter,
            float((B.T @ (w * q_of(lam))).max() / z_mass),
        )
    q = q_of(lam)
    return Solution(q, lam, it, float((B.T @ (w * q)).max() / z_mass))


def _largest_eigenvalue(B: np.ndarray, w: np.ndarray, iters: int = 200) -> float:
    """||B^T W B||_2, the dual gradient's Lipschitz constant: exact for up to 2048 bounds, else
    by power iteration (+1% margin) without forming the J x J matrix (J = 2m(1 + c): 10^4
    concepts would make it ~13 GB)."""
    if B.shape[1] <= 2048:  # small enough to form: exact
        return float(np.linalg.eigvalsh((B * w[:, None]).T @ B).max())
    v = np.random.default_rng(0).standard_normal(B.shape[1])
    value = 0.0
    for _ in range(iters):
        u = B.T @ (w * (B @ v))
        norm = float(np.linalg.norm(u))
        if norm == 0.0:
            return 0.0
        converged = abs(norm - value) <= 1e-9 * norm
        v, value = u / norm, norm
        if converged:
            break
    return 1.01 * value


def moments(patterns: np.ndarray, counts: np.ndarray, cfg: BalanceConfig) -> dict[str, Any]:
    """What the bounds measure, on examples given by pattern counts: each value's share among
    attributed examples, its gap to the target, and the largest association gap
    |E[(s_k - pi_k) y_r | z = 1]| (with the concept it is largest for)."""
    counts = np.asarray(counts, dtype=np.float64)
    m = len(cfg.attributes)
    s, y = patterns[:, :m].astype(np.float64), patterns[:, m:].astype(np.float64)
    z = s.sum(1) > 0
    attributed = float(counts[z].sum())
    out: dict[str, Any] = {"examples": int(counts.sum()), "attributed": int(attributed)}
    if attributed == 0:
        return out | {"share": {}, "max_representation_gap": 0.0, "max_association_gap": 0.0}
    pi = np.array([cfg.target[k] for k in cfg.attributes])
    share = (counts[:, None] * s).sum(0) / attributed
    out["share"] = {k: float(v) for k, v in zip(cfg.attributes, share)}
    out["max_representation_gap"] = float(np.abs(share - pi).max())
    if y.shape[1]:
        gap = s - pi[None, :] * z[:, None]
        assoc = np.einsum("g,gk,gr->kr", counts, gap, y) / attributed
        k, r = np.unravel_index(np.abs(assoc).argmax(), assoc.shape)
        out["max_association_gap"] = float(np.abs(assoc).max())
        out["max_association_pair"] = [list(cfg.attributes)[k], list(cfg.concepts)[r]]
    else:
        out["max_association_gap"] = 0.0
    return out


def repair(keep_counts: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Whole-example counts per pattern that meet every bound: rounding n_g q_g can break a
    bound by up to an example per pattern (patterns of a few examples: a few points of share),
    so while one is broken, drop one example: of the pattern whose drop leaves the least total
    violation, or, when no drop lowers it, of the pattern that narrows the worst bound most.
    Every step drops an example, and dropping every attributed example meets every bound, so
    it ends; it drops a handful where rounding broke a bound by a handful."""
    k = keep_counts.astype(np.int64).copy()
    active = np.abs(B).sum(1) > 0
    v = B.T @ k
    while v.max() > 1e-9:
        ok = (k > 0) & active
        if not ok.any():  # unreachable: with no attributed example kept every b_j sums to 0
            log.warning("balance: a bound is still broken after rounding and no example is left to drop")
            break
        total = np.maximum(v[None, :] - B, 0.0).sum(1)
        total[~ok] = np.inf
        g = int(total.argmin())
        if total[g] >= np.maximum(v, 0.0).sum():
            worst = int(v.argmax())
            g = int(np.where(ok, B[:, worst], -np.inf).argmax())
        k[g] -= 1
        v -= B[g]
    return k


def _round(pid: np.ndarray, attrs: np.ndarray, keep: np.ndarray, ranks: list[int], seed: int) -> np.ndarray:
    """Whole examples from keep probabilities, by systematic sampling: examples ordered by
    their attribute pattern, then pattern, then seeded key hash; an example is kept when the
    running sum of keep probabilities (from a seeded offset in [0, 1)) crosses an integer. Each
    pattern keeps floor or ceil of n_g q_g, the whole set round(sum q), and the rounding error
    carries within an attribute pattern instead of piling up per pattern (a pattern of one
    example at q = 0.6 is kept in 60% of such patterns, not in all)."""
    order = np.lexsort(
        (
            np.array(ranks, dtype=np.uint64),
            pid,
            np.array([int("".join(map(str, a)), 2) if len(a) else 0 for a in attrs])[pid],
        )
    )
    q = keep[pid][order]
    cum = np.random.default_rng(seed).random() + np.cumsum(q)
    crossed = np.floor(cum) > np.floor(cum - q)
    kept = np.zeros(len(pid), dtype=bool)
    kept[order[crossed]] = True
    return kept


def _rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


@dataclass
class KeepTable:
    """Per key: the keep probability of its pattern and whether it is kept."""

    keys: list[str]
    keep_prob: np.ndarray  # (N,) float
    kept: np.ndarray  # (N,) bool
    summary: dict[str, Any]

    def write(self, path: str | Path) -> Path:
        """A tsv (`key`, `keep_prob`, `kept` 0/1) and `<path>.json` with the summary."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write("key\tkeep_prob\tkept\n")
            for k, p, kept in zip(self.keys, self.keep_prob, self.kept):
                f.write(f"{k}\t{p:.6f}\t{int(kept)}\n")
        Path(str(path) + ".json").write_text(json.dumps(self.summary, indent=2) + "\n")
        return path


def balance(examples: Iterable[tuple[str, str, Mapping | None]], cfg: BalanceConfig, seed: int = 0) -> KeepTable:
    """`examples`: (key, caption, json or None), one pass. Keys must be unique. Returns the
    keep table: every pattern keeps round(n_g q_g) of its examples, those with the smallest
    seeded hash of their key."""
    ind = Indicators(cfg)
    keys: list[str] = []
    pattern_of: list[int] = []
    index: dict[tuple[int, ...], int] = {}
    for key, caption, meta in examples:
        s, y = ind(caption, meta)
        pattern_of.append(index.setdefault(s + y, len(index)))
        keys.append(key)
    if len(set(keys)) != len(keys):
        raise ValueError("balance: keys are not unique; the table would be ambiguous")
    if not keys:
        raise ValueError("balance: no example was read")
    patterns = np.array(list(index), dtype=np.int64).reshape(len(index), -1)
    pid = np.array(pattern_of)
    counts = np.bincount(pid, minlength=len(index)).astype(np.float64)
    present = patterns[:, : len(cfg.attributes)].T @ counts
    missing = [k for k, n in zip(cfg.attributes, present) if n == 0 and cfg.target[k] > 0]
    if missing:
        raise ValueError(
            f"balance: no example carries {missing}, whose target share is > 0: no kept set can "
            f"meet the representation bound (check the keywords / json path, or the target)"
        )
    sol = solve(patterns, counts, cfg)
    kept = _round(pid, patterns[:, : len(cfg.attributes)], sol.keep, [_rank(seed, k) for k in keys], seed)
    B = constraint_features(patterns, cfg)
    rounded = np.bincount(pid[kept], minlength=len(index))
    keep_counts = repair(rounded, B)
    for g in np.flatnonzero(keep_counts < rounded):  # repair's drops: the last kept of the pattern by rank
        members = np.flatnonzero((pid == g) & kept)
        order = sorted(members, key=lambda i: _rank(seed, keys[i]))
        kept[order[keep_counts[g] :]] = False
    before, after = moments(patterns, counts, cfg), moments(patterns, keep_counts, cfg)
    summary = {
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "seed": seed,
        "examples": len(keys),
        "kept": int(kept.sum()),
        "kept_fraction": float(kept.mean()),
        "patterns": len(index),
        "dual_iterations": sol.iterations,
        "max_violation": sol.max_violation,
        "before": before,
        "after": after,
        "max_keep_bound": max_keep_bound(patterns, counts, cfg),
    }
    return KeepTable(keys, sol.keep[pid], kept, summary)


def max_keep_bound(patterns: np.ndarray, counts: np.ndarray, cfg: BalanceConfig) -> float | None:
    """The largest fraction any per-pattern keep rule meeting the bounds could keep (an LP,
    scipy's HiGHS): what M4's L2 objective gives up for spreading its drops over patterns.
    None without scipy."""
    try:
        from scipy.optimize import linprog
    except ImportError:
        return None
    counts = np.asarray(counts, dtype=np.float64)
    w = counts / counts.sum()
    B = constraint_features(patterns, cfg)
    res = linprog(
        -w, A_ub=(B * w[:, None]).T, b_ub=np.zeros(B.shape[1]), bounds=[(0, cfg.keep_rate)] * len(w), method="highs"
    )
    return float(-res.fun) if res.success else None


# ---- the table in the loader ---------------------------------------------------------------


def table_key(url: str, key: str) -> str:
    """A sample's key in the table: its shard's folder and file name and its key
    (`siglip2.data.shards.shard_name`: keys of different shards may repeat, sources mixed by
    weight often share file names, and the two names survive a move of the data, e.g. from a
    local copy to ``s3://`` or ``pipe:``)."""
    from siglip2.data.shards import shard_name

    return f"{shard_name(url)}/{key}"


def load_dropped(path: str | Path) -> frozenset[str]:
    """The table keys a keep table drops (`kept` = 0). Raises FileNotFoundError / ValueError
    for a missing or malformed table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"balance table not found: {path} (python -m siglip2.data.balance writes it)")
    dropped = []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:1] != ["key"] or "kept" not in header:
            raise ValueError(f"{path}: not a balance table (header {header}, want key, keep_prob, kept)")
        col = header.index("kept")
        for n, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != len(header) or parts[col] not in ("0", "1"):
                raise ValueError(f"{path}:{n}: malformed row {line!r}")
            if parts[col] == "0":
                dropped.append(parts[0])
    return frozenset(dropped)


# ---- the command line --------------------------------------------------------------------


def read_examples(urls) -> Iterable[tuple[str, str, Mapping | None]]:
    """(table key, caption, json) of every sample of the shards, decoding no image; samples
    without a caption or with a bad json are counted and logged, then read as caption "" / no
    json (their indicators come from what is left)."""
    from siglip2.data.shards import _WorkerStats, expand_urls, read_shards

    stats = _WorkerStats()
    bad = 0
    for raw in read_shards([{"url": u} for u in expand_urls(urls)], stats):
        try:
            caption = raw["txt"].decode("utf-8") if "txt" in raw else ""
        except UnicodeDecodeError:
            caption, bad = "", bad + 1
        meta = None
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except ValueError:
                bad += 1
        yield table_key(raw["__url__"], raw["__key__"]), caption, meta
    if bad or stats.counts:
        log.warning(
            "balance: %d samples with an undecodable caption or json (read as empty); shard skips: %s",
            bad,
            dict(stats.counts),
        )


def main(argv: list[str] | None = None) -> KeepTable:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m siglip2.data.balance",
        description="M4 data balancing: write a per-key keep table for data.balance_table",
    )
    p.add_argument("--shards", required=True, help="shard pattern, e.g. '/data/{00000..00099}.tar'")
    p.add_argument("--config", required=True, help="balance yaml (BalanceConfig keys)")
    p.add_argument("--out", required=True, help="table path (.tsv); the summary goes to <out>.json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = BalanceConfig.from_yaml(args.config)
    table = balance(read_examples(args.shards), cfg, seed=args.seed)
    out = table.write(args.out)
    s = table.summary
    bound = "n/a" if s["max_keep_bound"] is None else f"{100 * s['max_keep_bound']:.1f}%"
    print(
        f"kept {s['kept']} of {s['examples']} examples ({100 * s['kept_fraction']:.1f}%; the most any per-pattern "
        f"rule meeting the bounds keeps: {bound})"
    )
    for when in ("before", "after"):
        m = s[when]
        print(
            f"{when}: attributed {m['attributed']}, shares "
            + ", ".join(f"{k} {v:.3f}" for k, v in m["share"].items())
            + f"; max representation gap {m['max_representation_gap']:.4f}, max association gap "
            f"{m['max_association_gap']:.4f}"
            + (f" ({' / '.join(m['max_association_pair'])})" if "max_association_pair" in m else "")
        )
    print(f"wrote {out} and {out}.json")
    return table


if __name__ == "__main__":
    main()
