"""The config.properties LocalTorchServe writes holds safe defaults; no server is started."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ts_handlers.metrics import METRICS_CONFIG
from ts_handlers.tools.server import (
    DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_MAX_RESPONSE_SIZE,
    PORT_NAMES,
    LocalTorchServe,
    properties_text,
)

PORTS = {name: 40000 + index for index, name in enumerate(PORT_NAMES)}
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")


def read_properties(path: Path) -> dict[str, str]:
    """key=value lines, unescaped as java.util.Properties does (enough for what we write)."""
    result = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if not line or line.startswith(("#", "!")):
            continue
        key, _, value = line.partition("=")
        value = re.sub(
            r"\\u([0-9a-fA-F]{4})|\\(.)",
            lambda m: chr(int(m.group(1), 16)) if m.group(1) else m.group(2),
            value,
        )
        result[key] = value.encode("utf-16", "surrogatepass").decode("utf-16")
    return result


def written(tmp_path: Path, **options) -> dict[str, str]:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    server = LocalTorchServe(store, **options)
    return read_properties(server.write_config(tmp_path, PORTS))


def test_token_authorization_is_on(tmp_path):
    properties = written(tmp_path)
    assert properties["disable_token_authorization"] == "false"


def test_model_api_is_off_by_default(tmp_path):
    assert written(tmp_path)["enable_model_api"] == "false"
    assert written(tmp_path, enable_model_api=True)["enable_model_api"] == "true"


def test_every_address_is_loopback(tmp_path):
    properties = written(tmp_path)
    for key in ADDRESS_KEYS:
        assert urlsplit(properties[key]).hostname == "127.0.0.1", key
    assert properties["grpc_inference_address"] == "127.0.0.1"
    assert properties["grpc_management_address"] == "127.0.0.1"
    other = written(tmp_path, host="::1")
    assert other["inference_address"] == f"http://[::1]:{PORTS['inference']}"


def test_sizes_are_set_and_can_be_changed(tmp_path):
    properties = written(tmp_path)
    assert int(properties["max_request_size"]) == DEFAULT_MAX_REQUEST_SIZE == 6_553_500
    assert int(properties["max_response_size"]) == DEFAULT_MAX_RESPONSE_SIZE == 6_553_500
    changed = written(tmp_path, max_request_size=1000, max_response_size=2000)
    assert (changed["max_request_size"], changed["max_response_size"]) == ("1000", "2000")
    with pytest.raises(ValueError, match="positive"):
        LocalTorchServe(tmp_path, max_response_size=0)


def allowed(pattern: str, url: str) -> bool:
    """TorchServe's ArchiveUtils.validateURL: each entry, case-insensitive unless it starts
    with Java's inline ``(?-i)`` (Python has only the scoped form), whole-string match."""
    matches = []
    for entry in pattern.split(","):
        sensitive = entry.startswith("(?-i)")
        entry = entry.removeprefix("(?-i)")
        matches.append(re.fullmatch(entry, url, 0 if sensitive else re.IGNORECASE))
    return any(matches)


def test_allowed_urls_admit_only_archives_in_the_model_store(tmp_path):
    properties = written(tmp_path, enable_model_api=True)
    store = (tmp_path / "store").resolve().as_posix()
    pattern = properties["allowed_urls"]
    assert allowed(pattern, f"file://{store}/mnist.mar")
    for url in (
        "https://example.com/mnist.mar",
        "http://127.0.0.1:8000/mnist.mar",
        "file:///etc/passwd",
        f"file://{store}/../mnist.mar",
        f"file://{store}/sub/mnist.mar",
        f"file://{store}evil/mnist.mar",
        f"file://{store}/mnist.tar.gz",
        f"s3://bucket{store}/mnist.mar",
        # Java decodes a file: URL's escapes when it opens it: this is ../x/evil.mar
        f"file://{store}/%2e%2e%2fx%2fevil.mar",
        f"file://{store}/%2E%2E%2Fevil.mar",
        f"file://{store}/mnist%2emar.mar",
        # another folder on a case-sensitive file system
        f"FILE://{store.upper()}/mnist.mar",
        f"file://{store}/MNIST.MAR",
    ):
        assert not allowed(pattern, url), url
    assert written(tmp_path)["allowed_urls"] == pattern  # restricted even with the API off


def test_special_characters_in_the_store_path_survive(tmp_path):
    store = tmp_path / "a.b+c (é)\\d"
    store.mkdir()
    server = LocalTorchServe(store)
    properties = read_properties(server.write_config(tmp_path, PORTS))
    assert properties["model_store"] == str(store.resolve())
    assert allowed(properties["allowed_urls"], f"file://{store.resolve().as_posix()}/x.mar")
    parent = store.resolve().parent.as_posix()
    assert not allowed(properties["allowed_urls"], f"file://{parent}/aXb+c (é)\\d/x.mar")
    with pytest.raises(ValueError, match="commas"):
        LocalTorchServe(tmp_path / "a,b").write_config(tmp_path, PORTS)
    with pytest.raises(ValueError, match="%"):
        LocalTorchServe(tmp_path / "a%2e").write_config(tmp_path, PORTS)


def test_caller_overrides_are_written_last(tmp_path):
    properties = written(tmp_path, extra_properties={"max_batch_delay": 5})
    assert properties["max_batch_delay"] == "5"
    assert properties["disable_token_authorization"] == "false"


def test_the_handler_parses_json_itself(tmp_path):
    assert written(tmp_path)["decode_input_request"] == "false"


def test_metrics_are_prometheus_with_the_shipped_config(tmp_path):
    properties = written(tmp_path)
    assert properties["metrics_mode"] == "prometheus"
    assert Path(properties["metrics_config"]) == METRICS_CONFIG
    assert METRICS_CONFIG.is_file() and METRICS_CONFIG.name == "metrics.yaml"
    assert properties["disable_system_metrics"] == "true"
    changed = written(tmp_path, extra_properties={"metrics_mode": "log"})
    assert changed["metrics_mode"] == "log"


def test_properties_escape_round_trips(tmp_path):
    path = tmp_path / "p.properties"
    path.write_text(properties_text({"a": "x\\y", "b": " lead", "c": "é😀"}), encoding="ascii")
    assert read_properties(path) == {"a": "x\\y", "b": " lead", "c": "é😀"}
    with pytest.raises(ValueError, match="line break"):
        properties_text({"a": "x\ny"})


JAVA_CHECK = """
import java.io.*;
import java.util.*;
import java.util.regex.Pattern;

public class AllowedUrls {
    public static void main(String[] args) throws Exception {
        Properties prop = new Properties();
        try (Reader reader = new FileReader(args[0])) { prop.load(reader); }
        for (int i = 1; i < args.length; i++) {
            boolean match = false;
            for (String entry : prop.getProperty("allowed_urls").split(",")) {
                Pattern pattern = Pattern.compile(entry, Pattern.CASE_INSENSITIVE);
                match |= pattern.matcher(args[i]).matches();
            }
            System.out.println(match);
        }
    }
}
"""


def test_java_reads_allowed_urls_as_meant(tmp_path):
    """The written value, read by java.util.Properties and matched as TorchServe matches it."""
    store = tmp_path / "my store.v2"
    store.mkdir()
    config = LocalTorchServe(store, enable_model_api=True).write_config(tmp_path, PORTS)
    source = tmp_path / "AllowedUrls.java"
    source.write_text(JAVA_CHECK)
    inside = f"file://{store.resolve().as_posix()}/mnist.mar"
    urls = [
        inside,
        inside.upper(),
        "https://example.com/mnist.mar",
        inside.replace(".v2", "Xv2"),
        inside.replace("mnist.mar", "%2e%2e%2fmnist.mar"),
        inside.replace("mnist.mar", "mnist.MAR"),
    ]
    result = subprocess.run(
        ["java", str(source), str(config), *urls],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.split() == ["true", "false", "false", "false", "false", "false"]


def test_the_server_inherits_no_ts_variables(tmp_path, monkeypatch):
    """TS_CONFIG_FILE would replace --ts-config, and TS_<PROPERTY> any written property."""
    monkeypatch.setenv("TS_CONFIG_FILE", str(tmp_path / "other.properties"))
    monkeypatch.setenv("TS_DISABLE_TOKEN_AUTHORIZATION", "true")
    monkeypatch.setenv("KEEP_ME", "1")
    env = LocalTorchServe(tmp_path, env={"TS_CHOSEN": "yes"}).server_env(tmp_path)
    assert not [key for key in env if key.startswith("TS_") and key != "TS_CHOSEN"]
    assert env["TS_CHOSEN"] == "yes"  # the caller's explicit env= is a deliberate choice
    assert env["KEEP_ME"] == "1"
    assert env["TMPDIR"] == str(tmp_path / "tmp")
