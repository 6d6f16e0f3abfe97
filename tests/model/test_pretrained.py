"""Published weights: the table, tag resolution for --checkpoint / --clip-weights, and `vip2clip download` against a
loopback HTTP server serving a small file (hash checked, atomic, offline message, install by hand)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import vip2clip
from vip2clip.cli import main
from vip2clip.model import pretrained
from vip2clip.model.pretrained import PretrainedError, PublishedWeights, get_pretrained, resolve_weights
from vip2clip.utils.download import DownloadError
from vip2clip.utils.hashing import git_blob_sha1


@pytest.fixture
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "weights"
    monkeypatch.setenv("VIP2CLIP_WEIGHTS_DIR", str(directory))
    return directory


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over tmp_path/www: (base URL, folder)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def small_entry(monkeypatch: pytest.MonkeyPatch, served: tuple[str, Path], demo_checkpoint: Path) -> PublishedWeights:
    """A published checkpoint in the table: the demo's checkpoint served over loopback, by its SHA-256."""
    base, folder = served
    payload = demo_checkpoint.read_bytes()
    (folder / "demo.pt").write_bytes(payload)
    entry = PublishedWeights(
        tag="demo-test", kind="checkpoint", backbone="tiny", image_size=128, filename="demo.pt",
        url=f"{base}/demo.pt", description="test file", sha256=hashlib.sha256(payload).hexdigest(),
    )  # fmt: skip
    table = {**pretrained._table(), "demo-test": entry}
    monkeypatch.setattr(pretrained, "_table", lambda: table)
    return entry


def test_table_lists_the_release_checkpoints_and_openai_weights() -> None:
    assert set(vip2clip.list_pretrained("checkpoint")) == {"release-mvtec", "release-visa"}
    openai = get_pretrained("openai-vit-l-14-336")
    # OpenAI publishes each archive under its own SHA-256.
    assert openai.kind == "clip" and openai.sha256 in openai.url and openai.backbone == "ViT-L-14-336"
    for tag in vip2clip.list_pretrained():
        entry = get_pretrained(tag)
        assert entry.url.startswith("https://") and entry.expected_hash
    with pytest.raises(PretrainedError, match="release-mvtec"):
        get_pretrained("release-mvtex")


def test_git_blob_id_equals_gits_own(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 40)
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout
    assert git_blob_sha1(path) == expected.strip()


def test_a_tag_that_is_not_downloaded_says_how_to_get_it(weights_dir: Path) -> None:
    with pytest.raises(PretrainedError, match=r"not downloaded yet: run `vip2clip download release-visa`.*--from FILE"):
        resolve_weights("release-visa", "checkpoint")
    with pytest.raises(PretrainedError, match="give it as --clip-weights"):
        resolve_weights("openai-vit-l-14-336", "checkpoint")
    assert resolve_weights("some/other.pt", "checkpoint") == "some/other.pt"  # the loaders report missing files


def test_download_verifies_installs_and_resolves(weights_dir: Path, small_entry: PublishedWeights, capsys) -> None:
    assert main(["download", "demo-test"]) == 0
    assert small_entry.path.is_file() and small_entry.path.parent.parent == weights_dir
    assert "verified" in capsys.readouterr().out
    # --checkpoint TAG now reaches the downloaded file, and the identity hashes that file.
    model = vip2clip.create_model(checkpoint="demo-test")
    assert model.config.backbone == "tiny"
    identity = vip2clip.Predictor.from_checkpoint("demo-test").identity
    assert identity.model.checkpoint == str(small_entry.path.resolve())
    assert identity.model.checkpoint_sha256 == small_entry.sha256


def test_a_download_with_another_hash_is_refused_and_leaves_nothing(
    weights_dir: Path, small_entry: PublishedWeights, served: tuple[str, Path], capsys
) -> None:
    (served[1] / "demo.pt").write_bytes(b"not the published file")
    assert main(["download", "demo-test"]) == 2
    assert "is not demo-test: its sha256 is" in capsys.readouterr().err
    assert not small_entry.path.exists()
    assert not list(weights_dir.rglob("*.tmp"))


def test_offline_download_names_the_url_and_the_manual_route(
    weights_dir: Path, small_entry: PublishedWeights, demo_checkpoint: Path, capsys
) -> None:
    with pytest.raises(DownloadError, match=r"cannot download http://127\.0\.0\.1:9/x\.pt.*--from FILE"):
        pretrained.download_pretrained("demo-test", url="http://127.0.0.1:9/x.pt")
    # The manual route: a file fetched elsewhere is checked and installed.
    assert main(["download", "demo-test", "--from", str(demo_checkpoint)]) == 0
    assert small_entry.path.read_bytes() == demo_checkpoint.read_bytes()


def test_a_damaged_installed_file_is_fetched_again(weights_dir: Path, small_entry: PublishedWeights) -> None:
    small_entry.path.parent.mkdir(parents=True)
    small_entry.path.write_bytes(b"truncated")
    assert pretrained.download_pretrained("demo-test") == small_entry.path
    small_entry.verify(small_entry.path)


def test_models_lists_presets_and_weights(weights_dir: Path, capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "ablation-utpa" in out and "Table 5 CLIP_UTPA" in out
    assert "release-mvtec" in out and "not downloaded" in out


def test_missing_clip_weights_name_the_published_tag() -> None:
    from vip2clip.inference.assembly import ModelSpec, build_model

    with pytest.raises(ValueError, match=r"--clip-weights openai-vit-l-14-336 \(after `vip2clip download"):
        build_model(ModelSpec(backbone="ViT-L-14-336", random_init=False))


def test_a_wrong_file_given_with_from_is_named_and_nothing_installed(
    weights_dir: Path, small_entry: PublishedWeights, tmp_path: Path, capsys
) -> None:
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"another file")
    assert main(["download", "demo-test", "--from", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert f"{wrong} is not demo-test" in err and "nothing was installed" in err
    assert ".tmp" not in err and "again" not in err  # neither the temporary file nor a fetch that would not help
    assert not small_entry.path.exists()


class _CutOffHandler(http.server.BaseHTTPRequestHandler):
    """Announces 1000 bytes and sends 300, then closes the connection."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 300)

    def log_message(self, *args) -> None:
        pass


def test_a_cut_off_download_says_so_with_the_byte_counts(
    weights_dir: Path, small_entry: PublishedWeights, capsys
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutOffHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/demo.pt"
        assert main(["download", "demo-test", "--url", url]) == 2
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert f"the download of {url} was cut off: 300 of 1,000 bytes arrived" in err, err
    assert not small_entry.path.exists() and not list(weights_dir.rglob("*.tmp"))


def test_a_file_placed_by_hand_is_hash_checked_before_use(
    weights_dir: Path, small_entry: PublishedWeights, demo_checkpoint: Path, capsys
) -> None:
    small_entry.path.parent.mkdir(parents=True)
    small_entry.path.write_bytes(b"placed by hand")
    assert main(["models"]) == 0
    assert "demo-test  (present, not verified yet" in capsys.readouterr().out
    with pytest.raises(PretrainedError, match=r"is not demo-test.*not installed by `vip2clip download`"):
        resolve_weights("demo-test", "checkpoint")
    small_entry.path.write_bytes(demo_checkpoint.read_bytes())  # the right file, placed by hand: checked once
    assert resolve_weights("demo-test", "checkpoint") == small_entry.path and small_entry.is_verified()
    assert main(["models"]) == 0
    assert "demo-test  (downloaded, hash verified)" in capsys.readouterr().out


def test_a_failed_open_clip_tag_gives_one_error_without_the_hubs_retry_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import open_clip

    from vip2clip.model.weights import WeightsError, load_clip

    def offline(*args, **kwargs):  # what open_clip does offline: huggingface_hub retries, then open_clip fails
        for attempt in range(1, 6):
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in %ds [Retry %d/5].", attempt, attempt)
        logging.getLogger().error("Failed to download weights for tag 'openai'")
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with caplog.at_level(logging.INFO), pytest.raises(WeightsError, match=r"could not load .*openai.*Offline\?"):
        load_clip("ViT-B-16", "openai")
    assert not caplog.records, [record.getMessage() for record in caplog.records]
    logging.getLogger("vip2clip").warning("logging works again")
    assert caplog.records
