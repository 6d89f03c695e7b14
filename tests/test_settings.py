"""Settings: derived locations, per-location overrides, and errors that name the setting."""

from __future__ import annotations

import base64
import os
from contextlib import nullcontext
from pathlib import Path

import pytest

from dropvault.flows.settings import Settings, SettingsError


def test_locations_derive_from_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROPVAULT_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("DROPVAULT_ARCHIVE_URL", "memory://elsewhere/archive")
    settings = Settings.load()
    assert settings.location_url("drops") == (tmp_path / "h" / "drops").as_uri()
    assert settings.location_url("archive") == "memory://elsewhere/archive"
    assert settings.catalog_path() == tmp_path / "h" / "catalog.duckdb"
    assert settings.quiet_seconds == 120
    home, _ = settings.init_home()
    assert (tmp_path / "h" / "keys" / "kek.key").exists()
    assert home.archive.url == "memory://elsewhere/archive"


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("DROPVAULT_QUIET_SECONDS", "soon", "DROPVAULT_QUIET_SECONDS"),
        ("DROPVAULT_QUIET_SECONDS", "-5", "DROPVAULT_QUIET_SECONDS"),
        ("DROPVAULT_DROPS_URL", "ftp://host/x", "DROPVAULT_DROPS_URL"),
        ("DROPVAULT_S3_ENDPOINT_URL", "http://s3.example.org", "DROPVAULT_S3_ENDPOINT_URL"),
        ("AWS_ENDPOINT_URL", "http://s3.example.org", "AWS_ENDPOINT_URL"),
        ("AWS_ENDPOINT_URL_S3", "http://s3.example.org", "AWS_ENDPOINT_URL_S3"),
        ("DROPVAULT_KEK", "not base64!", "DROPVAULT_KEK"),
        ("DROPVAULT_KEK", base64.b64encode(b"short").decode(), "DROPVAULT_KEK"),
        ("DROPVAULT_MAX_FILE_BYTES", "0", "DROPVAULT_MAX_FILE_BYTES"),
        # past 10,000 S3 parts of 5 MiB: an upload would fail after reading the whole file
        ("DROPVAULT_MAX_FILE_BYTES", str(46 * 1024**3), "DROPVAULT_MAX_FILE_BYTES"),
        ("DROPVAULT_DELIVERY_TTL_HOURS", "0", "DROPVAULT_DELIVERY_TTL_HOURS"),
        # past what a datetime can add (the run would overflow, not the start)
        ("DROPVAULT_DELIVERY_TTL_HOURS", "1e12", "DROPVAULT_DELIVERY_TTL_HOURS"),
        ("DROPVAULT_OUTBOX_URL", "ftp://host/x", "DROPVAULT_OUTBOX_URL"),
    ],
)
def test_bad_setting_names_itself(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        Settings.load()
    assert named in str(info.value)
    if env == "DROPVAULT_KEK":
        assert value not in str(info.value)  # never echo key material


def test_catalog_must_be_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROPVAULT_CATALOG_URL", "s3://bucket/catalog.duckdb")
    with pytest.raises(SettingsError, match="DROPVAULT_CATALOG_URL"):
        Settings.load().catalog_path()


def test_production_keys_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kek = base64.b64encode(b"k" * 32).decode()
    monkeypatch.setenv("DROPVAULT_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("DROPVAULT_KEK", kek)
    monkeypatch.setenv("DROPVAULT_PEPPER", base64.b64encode(b"p" * 32).decode())
    home, _ = Settings.load().init_home()
    assert home.pepper == b"p" * 32
    assert not (tmp_path / "h" / "keys" / "kek.key").exists()
    key_id, key = home.keystore.create()
    assert home.keystore.unwrap(key_id) == key


def test_runs_without_a_prefect_server_take_no_catalog_write_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An embedded server keeps concurrency leases in memory: a run killed -9 would hold
    the slot for good. Without PREFECT_API_URL the DuckDB file lock is the only guard."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("DROPVAULT_HOME", str(tmp_path / "h"))
    home, _ = Settings.load().init_home()
    guard = home.catalog.write_guard
    assert guard is not None
    # Decided at each write (building a home must not import Prefect's settings).
    assert not isinstance(guard(), nullcontext)  # the session's test server: a slot
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert isinstance(guard(), nullcontext)  # embedded: only DuckDB's file lock


@pytest.mark.parametrize(
    ("config", "refused"),
    [
        ("[profile lab]\nendpoint_url = http://s3.example.org\n", True),
        ("[profile lab]\ns3 =\n  endpoint_url = http://s3.example.org\n", True),
        (
            "[profile lab]\nservices = mine\n[services mine]\ns3 =\n"
            "  endpoint_url = http://s3.example.org\n",
            True,
        ),
        ("[profile lab]\ns3 =\n  endpoint_url = https://s3.example.org\n", False),
        ("[profile lab]\nendpoint_url = http://127.0.0.1:9000\n", False),
        ("[profile other]\nendpoint_url = http://s3.example.org\n", False),
    ],
)
def test_an_aws_profile_endpoint_follows_the_same_tls_rule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: str, refused: bool
) -> None:
    """botocore takes endpoint_url from the shared config file as from AWS_ENDPOINT_URL."""
    (tmp_path / "config").write_text(config)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    if not refused:
        Settings.load()
        return
    with pytest.raises(SettingsError, match=r"config \[.*(lab|mine).*must use https"):
        Settings.load()
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")  # botocore skips it too
    Settings.load()


def test_settings_do_not_import_prefect() -> None:
    """The CLI points PREFECT_HOME at the home (and sets Prefect's defaults) after reading
    the settings and before Prefect is first imported: an import here would undo that and
    the demo's embedded server would start with the wrong home and timeouts."""
    import subprocess
    import sys

    code = "import sys, dropvault.flows.settings; print('prefect' in sys.modules)"
    out = subprocess.run(  # noqa: S603 - this interpreter
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def no_prefect_settings(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """A working folder and an environment that name no Prefect server."""
    for var in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILES_PATH", "PREFECT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(folder)


@pytest.mark.parametrize(
    ("name", "text", "named"),
    [
        (".env", "PREFECT_API_URL=http://prefect:4200/api\n", True),
        (".env", "# PREFECT_API_URL=http://prefect:4200/api\nOTHER=1\n", False),
        ("prefect.toml", '[api]\nurl = "http://prefect:4200/api"\n', True),
        ("prefect.toml", '[logging]\nlevel = "INFO"\n', False),
        ("pyproject.toml", '[tool.prefect.api]\nurl = "http://prefect:4200/api"\n', True),
        ("pyproject.toml", '[project]\nname = "x"\n', False),
        ("prefect.toml", "[api\nnot toml", True),  # unreadable: let Prefect decide
        # What Prefect 3.9 itself reads there (an outside review compared case by case):
        (".env", "prefect_api_url=http://prefect:4200/api\n", True),  # any case
        (".env", 'PREFECT_API_URL=""\n', False),  # empty: Prefect has no server
        (".env", "PREFECT_API_URL= # none\n", False),
        ("prefect.toml", 'PREFECT_API_URL = "http://prefect:4200/api"\n', False),  # not read
        ("pyproject.toml", '[tool.prefect]\nPREFECT_API_URL = "http://p:4200/api"\n', False),
        ("prefect.toml", 'profiles_path = "p.toml"\n', True),  # see PROFILES below
        ("pyproject.toml", '[tool.prefect]\nprofiles_path = "p.toml"\n', True),
        (".env", "PREFECT_PROFILES_PATH=p.toml\n", True),
        # Not tables where tables belong: no crash; Prefect decides (and says what is wrong).
        ("pyproject.toml", 'tool = "x"\n', True),
        ("pyproject.toml", "[tool]\nprefect = 3\n", True),
        ("prefect.toml", 'api = "http://prefect:4200/api"\n', False),  # Prefect reads no url
    ],
)
def test_a_prefect_server_named_in_a_settings_file_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str, named: bool
) -> None:
    """The CLI starts a server of its own only where Prefect would find none: a server named
    in a file Prefect reads must get the runs, as one in PREFECT_API_URL does."""
    from dropvault.flows.settings import prefect_api_configured

    no_prefect_settings(monkeypatch, tmp_path)
    (tmp_path / "p.toml").write_text(PROFILES)  # read only where a setting names it
    assert prefect_api_configured() is False
    (tmp_path / name).write_text(text)
    assert prefect_api_configured() is named


PROFILES = 'active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://prefect:4200/api"\n'


def test_a_prefect_server_named_in_a_lower_case_variable_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dropvault.flows.settings import prefect_api_configured

    no_prefect_settings(monkeypatch, tmp_path)
    monkeypatch.setenv("prefect_api_url", "http://prefect:4200/api")  # pydantic: any case
    assert os.environ.get("PREFECT_API_URL") is None
    assert prefect_api_configured() is True


def test_the_home_servers_bypass_keeps_the_users_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib (and so botocore) reads the lower-case list first: a new one holding only
    127.0.0.1 would send an S3 endpoint the user exempted through the user's proxy."""
    import urllib.request

    from dropvault.flows import settings as settings_module

    # setenv on every variable it writes, so each is put back after the test
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("NO_PROXY", "s3.internal")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setattr(settings_module, "_on_home_server", [])
    monkeypatch.setenv("PREFECT_API_URL", "http://unused/api")
    settings_module.use_home_server("http://127.0.0.1:9/api")
    assert urllib.request.proxy_bypass_environment("s3.internal")
    assert urllib.request.proxy_bypass_environment("127.0.0.1")


def test_the_active_profile_of_the_users_prefect_home_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dropvault.flows.settings import prefect_api_configured

    no_prefect_settings(monkeypatch, tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "ph"))
    (tmp_path / "ph").mkdir()
    (tmp_path / "ph" / "profiles.toml").write_text(
        'active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://prefect:4200/api"\n'
        '[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n'
    )
    assert prefect_api_configured() is True
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert prefect_api_configured() is False


@pytest.mark.parametrize(
    ("raw", "ok"),
    [("180", True), (" 60 ", True), ("60.0", True), ("1_0", True), ("0", False)]
    + [("2.5", False), ("1e3", False), ("inf", False), ("soon", False), ("-5", False)],
)
def test_the_server_start_timeout_is_a_whole_number_of_seconds(
    monkeypatch: pytest.MonkeyPatch, raw: str, ok: bool
) -> None:
    """Prefect reads the same setting as an integer: what it would refuse after the server
    started is refused before, naming the setting."""
    from dropvault.flows.settings import server_start_timeout

    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raw)
    if ok:
        assert server_start_timeout() > 0
    else:
        with pytest.raises(SettingsError, match="PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
            server_start_timeout()
