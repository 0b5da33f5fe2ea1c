"""Adapters on the Hugging Face Hub: `hf://org/repo[@revision][/subfolder]`, read through `huggingface_hub`.

A branch or tag moves; a record must not. `HfSource.pin` turns the revision into the commit it names now, and the
registry records that, so every node fetches the files checked at registration, and a later push to the repo becomes
a new version only when the adapter is registered again.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from serve.adapters.sources import SourceUnreachable, check_size
from serve.adapters.validation import AdapterInvalid

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What an adapter is: only these are listed and fetched (within `MAX_FILES` by construction); the rest of a repo
(README, tokenizer, training checkpoints, pickles) is never downloaded, whatever its size."""
COMMIT = re.compile(r"[0-9a-f]{40}")
_URI = re.compile(r"hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[^/]+))?(?:/(?P<subfolder>.*))?")


@dataclass(frozen=True)
class HfUri:
    """The parts of an `hf://` source; a revision holding `/` (`refs/pr/1`) is written percent-encoded."""

    repo_id: str
    revision: str | None
    subfolder: str

    @classmethod
    def parse(cls, uri: str) -> HfUri:
        match = _URI.fullmatch(uri)
        subfolder = (match.group("subfolder") or "").strip("/") if match else ""
        if match is None or any(part in ("", ".", "..") for part in (subfolder.split("/") if subfolder else ())):
            raise AdapterInvalid(f"{uri} is not a Hugging Face source: use hf://ORG/REPO[@REVISION][/SUBFOLDER]")
        revision = unquote(match.group("revision")) if match.group("revision") else None
        return cls(match.group("repo"), revision, subfolder)

    def at(self, commit: str) -> str:
        """This source pinned to `commit`."""
        return f"hf://{self.repo_id}@{commit}" + (f"/{self.subfolder}" if self.subfolder else "")

    def __str__(self) -> str:
        revision = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"hf://{self.repo_id}{revision}" + (f"/{self.subfolder}" if self.subfolder else "")


@dataclass(frozen=True)
class HfSource:
    """The Hub at `endpoint` (None: huggingface_hub's default, `HF_ENDPOINT` or huggingface.co), with `token` for
    private and gated repos (None: the one huggingface_hub finds itself, `HF_TOKEN` or a saved login)."""

    endpoint: str | None = None
    token: str | None = field(default=None, repr=False)  # never in a repr, log or traceback

    def pin(self, uri: str) -> str:
        """`uri` at the commit its revision (default: the repo's default branch) names now."""
        source = HfUri.parse(uri)
        return source.at(self._commit(source))

    def fetch(self, uri: str, dest: Path, max_bytes: int | None = None) -> None:
        """Copies the adapter's files at one commit into `dest`, refusing them from the hub's listing (their sizes)
        before downloading any, when together they exceed `max_bytes`."""
        from huggingface_hub.hf_api import RepoFile

        source = HfUri.parse(uri)
        commit = self._commit(source)
        prefix = f"{source.subfolder}/" if source.subfolder else ""
        api = self._api()
        with _hub_errors(uri):
            listed = api.get_paths_info(source.repo_id, [prefix + name for name in ADAPTER_FILES], revision=commit)
        sizes = {
            item.path.removeprefix(prefix): _size(item)
            for item in listed
            if isinstance(item, RepoFile) and item.path.removeprefix(prefix) in ADAPTER_FILES
        }
        if not sizes:
            where = f"folder {source.subfolder!r}" if source.subfolder else "the repo's top folder"
            raise SourceUnreachable(f"no adapter at {uri}: neither {' nor '.join(ADAPTER_FILES)} is in {where}")
        check_size(uri, sum(sizes.values()), max_bytes)
        # A hidden sibling of `dest` (same disk: files move, not copy); node caches skip hidden folders.
        with tempfile.TemporaryDirectory(prefix=".hf-", dir=dest.parent) as scratch, _hub_errors(uri):
            for name in sizes:
                path = api.hf_hub_download(
                    source.repo_id, name, subfolder=source.subfolder or None, revision=commit, cache_dir=scratch
                )
                shutil.move(Path(str(path)).resolve(), dest / name)

    def _commit(self, source: HfUri) -> str:
        if source.revision is not None and COMMIT.fullmatch(source.revision):
            return source.revision  # already pinned: no call to the hub
        with _hub_errors(str(source)):
            sha = self._api().model_info(source.repo_id, revision=source.revision, expand=["sha"]).sha
        if sha is None:
            raise SourceUnreachable(f"cannot read {source}: the hub named no commit for it")
        return sha

    def _api(self) -> HfApi:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)


@contextmanager
def _hub_errors(uri: str) -> Iterator[None]:
    """Turns what huggingface_hub raises into our errors, naming the source: what the hub says is not there (or not
    for this token) is `SourceUnreachable`, as is a hub that cannot be reached; a request it refuses `AdapterInvalid`.
    Other `OSError`s (this machine's disk) pass through: the node cache answers those itself."""
    import httpx2
    from huggingface_hub import errors

    try:
        yield
    except errors.RepositoryNotFoundError:  # a gated repo's error is one too
        raise SourceUnreachable(f"cannot read {uri}: no such repo, or it is private or gated and the token "
                                "(HF_TOKEN or registry.hf_token) gives no access to it") from None  # fmt: skip
    except errors.RevisionNotFoundError:
        raise SourceUnreachable(f"cannot read {uri}: the repo has no such revision") from None
    except errors.RemoteEntryNotFoundError:
        raise SourceUnreachable(f"cannot read {uri}: a file of the adapter is not in the repo") from None
    except (errors.BadRequestError, errors.HFValidationError) as exc:
        raise AdapterInvalid(f"the hub refused {uri}: {_first_line(exc)}") from None
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.FileMetadataError,
            errors.OfflineModeIsEnabled) as exc:  # fmt: skip
        raise SourceUnreachable(f"cannot read {uri}: {_first_line(exc)}") from None
    except httpx2.TransportError as exc:
        raise SourceUnreachable(f"cannot reach the hub for {uri}: {_first_line(exc)}") from None


def _size(item: RepoFile) -> int:
    """A listed file's size in bytes (an LFS file's, not its pointer's)."""
    return item.lfs.size if item.lfs is not None else item.size


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
