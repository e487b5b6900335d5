"""Things computed once, in a folder named by the hash of what determines them (open_lth's run folders).

    <cache>/<kind>/<hash>/hparams.json              what was asked (a folder of other hyperparameters is refused)
    <cache>/<kind>/<hash>/weights.safetensors + metrics.json    a trained model, when there is one (``metrics.json``
                                                    written last: it marks the run finished and holds the checksums)
    <cache>/<kind>/<hash>/results/<name>-<key>.json cached results (``RunFolder.cached``)

``RunFolder`` is the folder: its seeds, its hyperparameters, its cached results. ``reasoner.CachedRun`` adds the
training of a LoRA model (the reasoner, chapter 5's students); chapter 3's LoRA recovery keeps only results in one
(``structured.lora_runs``). A folder can ship in the repository as a seed (``write_seed``, ``assets/<kind>/<hash>/``):
a fresh clone then reads what this machine computed once instead of computing it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from ._io import file_sha256, read_json, write_json
from .data import cache_dir


def digest(obj) -> str:
    """A short hash of a JSON-able object (names run folders and cached results)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested dict as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``): what a mismatch names."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


SEED_ROOT = Path(__file__).resolve().parents[1] / "assets"  # the repository's seeds (absent in a plain install)
SEED_MANIFEST = "seed.json"
SEED_RECORD = "training.json"  # a seed without weights keeps its run's metrics.json under this name


def seed_root() -> Path | None:
    """Where seeds are looked for: ``$PRUNING_LAB_SEEDS`` when set (``none``/empty: nowhere, everything is computed
    here), else the repository's ``assets/``."""
    env = os.environ.get("PRUNING_LAB_SEEDS")
    if env is not None:
        return None if env.strip().lower() in ("", "none", "off", "0") else Path(env)
    return SEED_ROOT


def claim_folder(folder: Path, spec: dict) -> None:
    """Write ``spec`` as ``folder/hparams.json``, or refuse (naming what differs) when the folder already holds a run
    of other hyperparameters: two runs never mix in one folder."""
    path = Path(folder) / "hparams.json"
    mine = json.loads(json.dumps(spec))
    if not path.is_file():
        write_json(path, mine)
        return
    try:
        theirs = read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete the folder {folder} or choose another.") from e
    a, b = flat_keys(theirs), flat_keys(mine)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        listed = "; ".join(f"{k}: folder has {a.get(k)!r}, you asked {b.get(k)!r}" for k in diff[:5])
        raise ValueError(f"{folder} holds a run with different hyperparameters ({listed}). Refusing to mix them: use "
                         "another folder (or the default, which is named by the hash).")


class RunFolder:
    """A folder ``<cache>/<kind>/<hash>`` named by the hash of ``spec`` (a JSON-able dict of everything that determines
    what it holds): a trained model (``weights.safetensors`` + ``metrics.json``, written by a subclass such as
    ``reasoner.CachedRun``) and/or results computed once (``cached``).

    **Seeds.** A folder computed once can ship in the repository, read-only, as ``assets/<kind>/<hash>/``
    (``write_seed``): the same files plus ``seed.json``, the SHA-256 of each. When the cache folder lacks something the
    seed has, the seed is verified (a file that does not match its checksum is refused, nothing copied) and copied in
    atomically; a finished run in the cache is never overwritten, and cached results are only added (never replaced)
    when they belong to the same weights. A seed may leave the weights out (``weights=False``: only results, the
    training record in ``training.json``): then ``metrics`` stays None (a subclass trains again), while ``cached``
    reads the seeded results. To compute everything here: delete the cache folder and set ``PRUNING_LAB_SEEDS=none``
    (or delete the seed), or change a hyperparameter (a new hash has no seed).

    Give ``kind`` and ``spec`` as arguments or define them in a subclass."""

    kind = "run"
    seed_root: Path | None = None  # None: ``seed_root()`` (the repository's assets/ or $PRUNING_LAB_SEEDS)

    def __init__(self, root: str | Path | None = None, *, kind: str | None = None, spec: dict | None = None,
                 progress: bool = True):
        if kind is not None:
            self.kind = kind
        if spec is not None:
            self.spec = spec
        self.progress = progress
        self.dir = Path(root or cache_dir(self.kind)) / self.hash
        self._seeded = False

    spec: dict

    @property
    def hash(self) -> str:
        return digest({"spec": self.spec})

    @property
    def seed_dir(self) -> Path | None:
        root = self.seed_root if self.seed_root is not None else seed_root()
        return None if root is None else Path(root) / self.kind / self.hash

    def _seed(self) -> None:
        """Copy this run's seed into the cache folder when it has something the folder lacks (see the class)."""
        if self._seeded:
            return
        self._seeded = True
        src = self.seed_dir
        if src is None or not (src / SEED_MANIFEST).is_file():
            return
        try:
            manifest = read_json(src / SEED_MANIFEST)
            files, weights = dict(manifest["files"]), dict(manifest["weights"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"The seed {src} has an unreadable {SEED_MANIFEST} ({e}): restore it (git checkout -- "
                             f"{src}) or delete the folder to compute the run here. Nothing was copied.") from e
        if manifest.get("hash") != self.hash:
            raise ValueError(f"The seed {src} says it holds run {manifest.get('hash')!r}, not {self.hash}: restore it "
                             "or delete the folder. Nothing was copied.")
        for name, expected in files.items():  # verify everything before anything is copied
            f = src / name
            if not f.is_file() or file_sha256(f) != expected:
                raise ValueError(f"The seed {src} is damaged: {name} is missing or does not match its checksum in "
                                 f"{SEED_MANIFEST}. Restore it (git checkout -- {src}) or delete the folder to compute "
                                 "the run here. Nothing was copied.")
        if "hparams.json" in files and flat_keys(read_json(src / "hparams.json")) != flat_keys(json.loads(json.dumps(self.spec))):
            raise ValueError(f"The seed {src} holds other hyperparameters than run {self.hash}: restore it or delete "
                             "the folder. Nothing was copied.")
        finished = self._read_metrics()
        if finished is not None and {k: finished.get("files", {}).get(k) for k in weights} != weights:
            return  # a run trained here: the seed's results belong to other weights
        todo = [n for n in files if not (self.dir / n).exists()]
        if finished is not None:
            todo = [n for n in todo if n not in ("metrics.json", *weights)]
        if not todo:
            return
        # copy into a staging folder beside the cache folder, verify, then move in: results, hparams, weights, and
        # metrics.json last (its presence marks the run finished)
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".seed-{self.hash}-", dir=self.dir.parent))
        try:
            for name in todo:
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, stage / name)
                if file_sha256(stage / name) != files[name]:
                    raise OSError(f"copying {src / name} to {stage} changed it")
            if not self.dir.exists():
                os.rename(stage, self.dir)  # one rename: the folder appears complete
                return
            for name in sorted(todo, key=lambda n: (n == "metrics.json", n in weights, n)):
                dest = self.dir / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not dest.exists():
                    os.replace(stage / name, dest)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _check_folder(self) -> None:
        self._seed()
        claim_folder(self.dir, self.spec)

    @property
    def metrics(self) -> dict | None:
        """The verified metrics of the finished run (copied from its seed when there is one), None when it is not
        (completely) trained."""
        self._seed()
        return self._read_metrics()

    @property
    def training_record(self) -> dict | None:
        """What the training of this run recorded (history, tokens, seconds): ``metrics``, or the record a seed
        without weights brought (``training.json``); None when neither exists."""
        m = self.metrics
        if m is None and (self.dir / SEED_RECORD).is_file():
            m = read_json(self.dir / SEED_RECORD)
        return m

    def _read_metrics(self) -> dict | None:
        path = self.dir / "metrics.json"
        if not path.is_file():
            return None
        try:
            m = read_json(path)
            for name, expected in m["files"].items():
                f = self.dir / name
                if not f.is_file() or file_sha256(f) != expected:
                    raise ValueError(f"{f} is missing or does not match its checksum")
            return m
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"{self.dir}: the finished run is damaged ({e}); it will be trained again.", stacklevel=3)
            return None

    def cached(self, name: str, key: dict, compute):
        """``compute()``'s JSON result, stored once under ``results/<name>-<hash of key>.json`` beside the weights
        (the key is stored too and checked on reading); the first call writes the folder's ``hparams.json``."""
        self._check_folder()
        path = self.dir / "results" / f"{name}-{digest(key)}.json"
        if path.is_file():
            try:
                saved = read_json(path)
                if saved.get("key") == json.loads(json.dumps(key)):
                    return saved["value"]
            except (OSError, ValueError):
                pass
        value = compute()
        write_json(path, {"key": key, "value": value})
        return read_json(path)["value"]


def write_seed(run: RunFolder, root: str | Path, *, weights: bool = True, results: list[str] | None = None) -> Path:
    """Write ``run``'s cache folder as a seed ``<root>/<kind>/<hash>/`` (see ``RunFolder``): hparams.json, the cached
    ``results`` (file names under results/; default: all), and the weights with metrics.json (``weights=True``, the
    run must be finished) or only its training record as training.json; ``seed.json`` (checksums) is written last."""
    src, dest = run.dir, Path(root) / run.kind / run.hash
    m = run._read_metrics()
    if weights and (m is None or "files" not in m):
        raise ValueError(f"{src} holds no finished run with weights to seed (weights=False seeds its results only).")
    names = sorted(p.name for p in (src / "results").glob("*.json")) if results is None else list(results)
    copy = {"hparams.json": "hparams.json", **{f"results/{n}": f"results/{n}" for n in names}}
    if m is not None and "files" in m:
        copy.update({k: k for k in m["files"]} if weights else {})
        copy["metrics.json" if weights else SEED_RECORD] = "metrics.json"
    if dest.exists():
        shutil.rmtree(dest)
    files = {}
    for to, frm in copy.items():
        (dest / to).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / frm, dest / to)
        files[to] = file_sha256(dest / to)
    write_json(dest / SEED_MANIFEST, {"hash": run.hash, "kind": run.kind, "files": files,
                                      "weights": dict(m["files"]) if m is not None and "files" in m else {},
                                      "weights_included": bool(weights)})
    return dest




class _Opened(RunFolder):
    """A run folder as found on disk: its name is its hash (whatever rule named it)."""

    def __init__(self, path: Path):
        self.kind, self.spec, self._name = path.parent.name, read_json(path / "hparams.json"), path.name
        super().__init__(path.parent, progress=False)

    @property
    def hash(self) -> str:
        return self._name


def open_folder(path: str | Path) -> RunFolder:
    """The run folder at ``path`` (``<cache>/<kind>/<hash>``) as it is, its hyperparameters read from its
    ``hparams.json``: what ``write_seed`` needs to ship it (``python -m pruning_lab seed PATH``)."""
    path = Path(path).expanduser().resolve()
    if not (path / "hparams.json").is_file():
        raise FileNotFoundError(f"{path} is not a run folder (no hparams.json): give <cache>/<kind>/<hash>, e.g. "
                                f"{cache_dir('lora_recovery')}/<hash>.")
    return _Opened(path)


def fingerprint(obj) -> str:
    """A short SHA-256 of a model's state (every state_dict entry's name, shape, dtype and bytes) or of one tensor:
    what names a cached result computed from exactly these weights or token ids (about 0.3 s for a 135M model)."""
    import torch

    items = obj.state_dict().items() if isinstance(obj, torch.nn.Module) else [("", obj)]
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]
