"""Composite adapters: weighted combinations of registered adapters, made by PEFT's `add_weighted_adapter`.

The registry builds a composite once per canonical (method, components' content hashes, weights, density, seed)
(`serve.wire.canonical`), stores its files where every node can read them (`CompositeStore`), and records it like
any adapter, so node caches, engines and routing treat it as one. PEFT does the maths; only the base model's
architecture is needed, not its weights: the model is built on the meta device and given uninitialised CPU storage
that is never touched (a 7B base costs no resident memory), since combining LoRA weights reads no base weight.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from serve.adapters.sources import S3Source
from serve.adapters.validation import AdapterInvalid
from serve.wire import DENSITY_METHODS, MAX_WEIGHT, WEIGHT_DECIMALS, Composition

SAME_RANK_METHODS = frozenset({"linear", "ties", "dare_linear", "dare_ties"})
"""PEFT combines these element-wise, so every component must have the same rank."""
_KEY = re.compile(r"[0-9a-f]{64}")
"""A composite's name in its store (`serve.wire.composition_key`); the store lists nothing else."""
CONFIG = "adapter_config.json"


def composite_rank(method: str, ranks: dict[str, int], max_rank: int) -> int:
    """The rank PEFT gives the composite of adapters of `ranks`; `AdapterInvalid` when it cannot or it is too big."""
    if method in SAME_RANK_METHODS and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{name} r={rank}" for name, rank in ranks.items())
        message = f"method {method!r} needs components of one rank ({listed}); use cat or svd"
        raise AdapterInvalid(message, "compose.method")
    rank = sum(ranks.values()) if method == "cat" else max(ranks.values())
    if rank > max_rank:
        raise AdapterInvalid(
            f"the composite's rank would be {rank} ({method} of ranks {sorted(ranks.values())}), over the engine's "
            f"max_lora_rank of {max_rank}",
            "compose.adapters",
        )
    return rank


def check_arguments(composition: Composition) -> None:
    """What PEFT would refuse, or would build to no purpose, refused first with the field to blame; `composition`
    is canonical (`serve.wire.canonical`)."""
    if len(composition.adapters) != len(set(composition.adapters)):
        raise AdapterInvalid("a composite lists each adapter once", "compose.adapters")
    if len(composition.weights) != len(composition.adapters):
        raise AdapterInvalid("a composite gives one weight per adapter", "compose.adapters")
    for i, weight in enumerate(composition.weights):
        if not (math.isfinite(weight) and 0 < abs(weight) <= MAX_WEIGHT):
            raise AdapterInvalid(f"a weight is a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} that is not 0 at "
                                 f"{WEIGHT_DECIMALS} decimals: {weight!r}", f"compose.adapters.{i}.weight")  # fmt: skip
    if composition.method in DENSITY_METHODS:
        if composition.density is None or not 0 < composition.density <= 1:
            raise AdapterInvalid(f"method {composition.method!r} needs a density (0 < density <= 1)", "compose.density")
    elif composition.density is not None:
        raise AdapterInvalid(f"method {composition.method!r} takes no density", "compose.density")


class Composer:
    """Builds composites on one base model's architecture (thread-safe: PEFT changes the model it works on)."""

    def __init__(self, base_model: Path) -> None:
        self._base_model = base_model
        self._skeleton: Any = None
        self._lock = threading.Lock()

    def build(self, composition: Composition, folders: list[Path], out: Path) -> None:
        """Writes the composite of the adapters in `folders` (in `composition.adapters` order) as a PEFT adapter
        folder `out`. Blocking (PEFT and torch): call it off the event loop."""
        import torch
        from peft import PeftModel

        names = [f"c{i}" for i in range(len(folders))]
        with self._lock:
            model: Any = PeftModel.from_pretrained(self._base(), str(folders[0]), adapter_name=names[0])
            try:
                for name, folder in zip(names[1:], folders[1:], strict=True):
                    model.load_adapter(str(folder), adapter_name=name)
                torch.manual_seed(composition.seed)
                model.add_weighted_adapter(
                    names, list(composition.weights), "composite",
                    combination_type=composition.method, density=composition.density,
                )  # fmt: skip
                with tempfile.TemporaryDirectory() as saved:
                    model.save_pretrained(
                        saved, selected_adapters=["composite"], safe_serialization=True, save_embedding_layers=False
                    )  # "auto" would look the base model up on the Hugging Face Hub
                    out.mkdir(parents=True, exist_ok=True)
                    for file in (Path(saved) / "composite").iterdir():
                        shutil.copy2(file, out / file.name)
            except ValueError as exc:  # PEFT's refusal of these inputs
                raise AdapterInvalid(f"PEFT cannot combine these adapters: {exc}", "compose.adapters") from None
            finally:
                self._skeleton = model.unload()

    def _base(self) -> Any:
        if self._skeleton is None:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self._base_model)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            self._skeleton = model.to_empty(device="cpu")  # storage allocated, never written: not resident
        return self._skeleton


@dataclass(frozen=True)
class CompositeStore:
    """Where built composites live: `root/KEY/` in a folder or under an S3 prefix, read back like any source."""

    root: str
    s3: S3Source

    def url(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def has(self, key: str) -> bool:
        if not self._is_s3():
            return (Path(self.root) / key / CONFIG).is_file()
        bucket, prefix = self._bucket_prefix(key)
        listing = self.s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{CONFIG}", MaxKeys=1)
        return bool(listing.get("Contents"))

    def stored(self) -> dict[str, float]:
        """Every composite in the store, whole or not, with the store's own timestamp of it (seconds since the epoch):
        a folder's mtime, or the newest LastModified of its S3 objects."""
        if not self._is_s3():
            root = Path(self.root)
            entries = root.iterdir() if root.is_dir() else ()
            return {entry.name: entry.stat().st_mtime for entry in entries if _KEY.fullmatch(entry.name)}
        bucket, prefix = self._bucket_prefix("")
        stamps: dict[str, float] = {}
        for page in self.s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                key = item["Key"][len(prefix) :].split("/", 1)[0]
                if _KEY.fullmatch(key):
                    stamps[key] = max(stamps.get(key, 0.0), item["LastModified"].timestamp())
        return stamps

    def touch(self, key: str, at: float) -> None:
        """Moves composite `key`'s timestamp (`stored`) to `at`; on S3, where only a write moves it, to now."""
        if not self._is_s3():
            os.utime(Path(self.root) / key, (at, at))
            return
        bucket, prefix = self._bucket_prefix(key)
        config = f"{prefix}/{CONFIG}"
        self.s3.client().copy_object(Bucket=bucket, Key=config, CopySource={"Bucket": bucket, "Key": config},
                                     MetadataDirective="REPLACE")  # fmt: skip

    def remove(self, key: str) -> None:
        """Deletes composite `key`: its config first, so `has` never sees half a composite (as `publish`)."""
        if not self._is_s3():
            gone = Path(tempfile.mkdtemp(prefix=".gone-", dir=self.root))
            try:
                (Path(self.root) / key).rename(gone / key)  # at once: no reader sees it half deleted
            except FileNotFoundError:
                pass  # another registry on this store removed it first
            finally:
                shutil.rmtree(gone)
            return
        bucket, prefix = self._bucket_prefix(key)
        client = self.s3.client()
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{CONFIG}")
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", ())]
            if objects:  # a page holds at most 1,000 keys, as many as one delete_objects takes
                failed = client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True}).get("Errors")
                if failed:
                    raise OSError(f"could not delete {len(failed)} objects of {self.url(key)}: {failed[0]}")

    def publish(self, folder: Path, key: str) -> None:
        """Stores `folder`'s files as composite `key`; the config last, so `has` never sees half a composite."""
        files = sorted(folder.iterdir(), key=lambda file: file.name == CONFIG)
        if self._is_s3():
            bucket, prefix = self._bucket_prefix(key)
            client = self.s3.client()
            for file in files:
                client.upload_file(str(file), bucket, f"{prefix}/{file.name}")
            return
        root = Path(self.root)
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            for file in files:
                shutil.copy2(file, staging / file.name)
            try:
                staging.rename(root / key)
            except OSError:
                if not self.has(key):  # not another build of the same composite that got there first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _is_s3(self) -> bool:
        return self.root.startswith("s3://")

    def _bucket_prefix(self, key: str) -> tuple[str, str]:
        """The bucket and object prefix of composite `key`; of the whole store for "" (ending in `/` unless empty)."""
        parsed = urlparse(self.url(key))
        prefix = parsed.path.strip("/")
        return parsed.netloc, prefix if key or not prefix else prefix + "/"
