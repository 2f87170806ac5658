"""Settings: sources and precedence, one clear error per wrong setting, secrets redacted."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from collector.config import Secret, Settings, SettingsError, load_settings, unknown_variables


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.outbound_url == "https://api.outbound.io"
    assert settings.dry_run
    assert (settings.max_body_bytes, settings.max_event_bytes, settings.max_batch_events) == (
        512 * 1024,
        32 * 1024,
        100,
    )


def test_flags_win_over_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    config = tmp_path / "collector.toml"
    config.write_text(
        'port = 7000\nhost = "0.0.0.0"\npage_event_name = "Page"\n'
        'allowed_origins = ["https://a.example", "https://b.example:8443"]\n'
    )
    settings = load_settings(
        flags={"port": "9000", "host": None},
        environ={"COLLECTOR_PORT": "8000", "COLLECTOR_HOST": "::1"},
        config_file=config,
    )
    assert settings.port == 9000
    assert settings.host == "::1"
    assert settings.page_event_name == "Page"
    assert settings.allowed_origins == ("https://a.example", "https://b.example:8443")


def test_environment_names_from_the_design() -> None:
    settings = load_settings(
        environ={
            "OUTBOUND_API_KEY": "k-123",
            "COLLECTOR_OUTBOUND_URL": "http://127.0.0.1:9/",
            "COLLECTOR_ALLOWED_ORIGINS": "https://a.example, http://localhost:3000",
            "COLLECTOR_DATA_DIR": "/srv/collector",
            "COLLECTOR_TRUSTED_PROXIES": "10.0.0.0/8,::1",
        }
    )
    assert settings.outbound_api_key == Secret("k-123")
    assert settings.outbound_url == "http://127.0.0.1:9"
    assert settings.allowed_origins == ("https://a.example", "http://localhost:3000")
    assert settings.data_dir == Path("/srv/collector")
    assert settings.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert not settings.dry_run


def test_secrets_never_print() -> None:
    settings = load_settings(environ={"OUTBOUND_API_KEY": "k-very-secret"})
    for text in (repr(settings), str(settings), str(settings.redacted())):
        assert "k-very-secret" not in text
    assert settings.redacted()["outbound_api_key"] == "******** (set)"
    assert settings.outbound_api_key is not None
    assert settings.outbound_api_key.reveal() == "k-very-secret"


@pytest.mark.parametrize(
    ("environ", "setting", "problem"),
    [
        ({"COLLECTOR_PORT": "eighty"}, "COLLECTOR_PORT", "must be a whole number"),
        ({"COLLECTOR_PORT": "70000"}, "COLLECTOR_PORT", "must be from 0 to 65535"),
        ({"COLLECTOR_PORT": "-1"}, "COLLECTOR_PORT", "must be from 0 to 65535"),
        (
            {"COLLECTOR_ALLOWED_ORIGINS": "example.com"},
            "COLLECTOR_ALLOWED_ORIGINS",
            "not an origin",
        ),
        (
            {"COLLECTOR_ALLOWED_ORIGINS": "https://example.com/"},
            "COLLECTOR_ALLOWED_ORIGINS",
            "without a path",
        ),
        (
            {"COLLECTOR_ALLOWED_ORIGINS": "https://Example.com"},
            "COLLECTOR_ALLOWED_ORIGINS",
            "lower case",
        ),
        (
            {"COLLECTOR_ALLOWED_ORIGINS": "https://example.com:443"},
            "COLLECTOR_ALLOWED_ORIGINS",
            "default port",
        ),
        (
            {"COLLECTOR_ALLOWED_ORIGINS": "https://example.com:99999"},
            "COLLECTOR_ALLOWED_ORIGINS",
            "invalid port",
        ),
        (
            {"COLLECTOR_ALLOWED_ORIGINS": "*,https://a.example"},
            "COLLECTOR_ALLOWED_ORIGINS",
            "cannot be combined",
        ),
        ({"COLLECTOR_OUTBOUND_URL": "ftp://x"}, "COLLECTOR_OUTBOUND_URL", "http:// or https://"),
        ({"COLLECTOR_SCHEMAS_DIR": "/no/such/dir"}, "COLLECTOR_SCHEMAS_DIR", "not a directory"),
        ({"COLLECTOR_TRUSTED_PROXIES": "10.0.0.0/33"}, "COLLECTOR_TRUSTED_PROXIES", "not an IP"),
        (
            {"COLLECTOR_DURABILITY": "sometimes"},
            "COLLECTOR_DURABILITY",
            "must be one of normal, full",
        ),
        ({"COLLECTOR_RELAY_TIMEOUT": "0"}, "COLLECTOR_RELAY_TIMEOUT", "positive number"),
        ({"COLLECTOR_RELAY_TIMEOUT": "nan"}, "COLLECTOR_RELAY_TIMEOUT", "positive number"),
        ({"COLLECTOR_DEDUPE_WINDOW": "-1"}, "COLLECTOR_DEDUPE_WINDOW", "zero or more seconds"),
        ({"COLLECTOR_RETRY_CAP": "true"}, "COLLECTOR_RETRY_CAP", "number of seconds"),
        ({"COLLECTOR_SCRIPT_PATH": "s.js"}, "COLLECTOR_SCRIPT_PATH", "starting with '/'"),
        ({"COLLECTOR_MAX_BATCH_EVENTS": "0"}, "COLLECTOR_MAX_BATCH_EVENTS", "at least 1"),
        (
            {"COLLECTOR_RETRY_BASE": "600"},
            "COLLECTOR_RETRY_BASE",
            "must not be more than retry_cap (300 s by default); got 600",
        ),
    ],
)
def test_wrong_setting_names_the_setting_and_the_problem(
    environ: dict[str, str], setting: str, problem: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ=environ)
    assert raised.value.setting == setting
    assert problem in raised.value.problem


def test_unknown_key_in_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("prot = 8080\n")
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={}, config_file=config)
    assert raised.value.setting == str(config)
    assert raised.value.problem == "unknown setting 'prot'"


def test_wrong_type_in_the_file_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("port = true\n")
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={}, config_file=config)
    assert raised.value.setting == f"port in {config}"


def test_broken_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(environ={}, config_file=broken)
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(environ={}, config_file=tmp_path / "missing.toml")


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("key", ["k-123\r\nX-Injected: 1", "clé-secrète", "tab\there"])
def test_the_outbound_key_must_fit_in_a_header(key: str) -> None:
    with pytest.raises(SettingsError, match="printable ASCII"):
        load_settings(environ={"OUTBOUND_API_KEY": key})


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://api.outbound.io/v2", "https://api.outbound.io"),
        ("https://api.outbound.io/v2/", "https://api.outbound.io"),
        ("https://api.outbound.io/V2/track", "https://api.outbound.io"),
        ("http://127.0.0.1:9000/outbound/v2", "http://127.0.0.1:9000/outbound"),
    ],
)
def test_outbound_url_with_the_v2_path_is_refused_with_the_base_to_use(url: str, base: str) -> None:
    # The relay adds /v2/track itself: .../v2 would make every call .../v2/v2/track, a 404
    # that dead-letters every event.
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={"COLLECTOR_OUTBOUND_URL": url})
    assert raised.value.setting == "COLLECTOR_OUTBOUND_URL"
    assert raised.value.problem == (
        f"must be the base URL without /v2 (the collector adds /v2/track and /v2/identify "
        f"itself): use {base!r}, got {url!r}"
    )


def test_outbound_url_may_have_a_path_of_its_own() -> None:
    settings = load_settings(environ={"COLLECTOR_OUTBOUND_URL": "https://gw.example/v2x/"})
    assert settings.outbound_url == "https://gw.example/v2x"


@pytest.mark.parametrize(
    ("environ", "setting", "problem"),
    [
        (
            {"COLLECTOR_LEASE_SECONDS": "15"},
            "COLLECTOR_LEASE_SECONDS",
            "must be more than twice relay_timeout (10 s by default), so more than 20 seconds; "
            "got 15",
        ),
        (
            # The lease is left at its default: the line names the variable that changes it.
            {"COLLECTOR_RELAY_TIMEOUT": "40"},
            "COLLECTOR_LEASE_SECONDS",
            "must be more than twice relay_timeout (40 s, from COLLECTOR_RELAY_TIMEOUT), so "
            "more than 80 seconds; got 60, its default",
        ),
    ],
)
def test_lease_error_names_the_variables_and_the_values(
    environ: dict[str, str], setting: str, problem: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ=environ)
    assert (raised.value.setting, raised.value.problem) == (setting, problem)


@pytest.mark.parametrize("name", ["COLLECTOR_RATE_LIMIT_PER_IP", "COLLECTOR_RATE_LIMIT_PER_USER"])
@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("fast", "must be a number of events per second (0: no limit), got 'fast'"),
        ("-5", "must be a number of events per second (0: no limit), got '-5'"),
        ("inf", "must be a number of events per second (0: no limit), got 'inf'"),
    ],
)
def test_rate_errors_speak_of_events_per_second(name: str, raw: str, problem: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={name: raw})
    assert (raised.value.setting, raised.value.problem) == (name, problem)
    assert "seconds" not in raised.value.problem


@pytest.mark.parametrize("secret", ["q7", "hunter2-is-too-short", "x" * 31])
def test_a_short_identity_secret_is_refused_with_the_reason(secret: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={"COLLECTOR_IDENTITY_SECRET": secret})
    assert raised.value.setting == "COLLECTOR_IDENTITY_SECRET"
    assert raised.value.problem.startswith(
        f"must be at least 32 characters long, this one has {len(secret)}: it is the HMAC key "
        "that proves a user_hash came from your back-end; a short or guessable key lets anyone "
        "compute hashes and send events as any of your users"
    )
    assert secret not in str(raised.value)


def test_an_identity_secret_of_32_characters_is_taken() -> None:
    settings = load_settings(environ={"COLLECTOR_IDENTITY_SECRET": "k" * 32})
    assert settings.identity_secret == Secret("k" * 32)


def test_misspelt_variables_get_a_warning_with_the_closest_name() -> None:
    environ = {
        "COLLECTOR_PORTT": "9000",
        "COLLECTOR_ALLOWED_ORIGIN": "https://a.example",
        "OUTBOUND_APIKEY": "k-never-shown",
        "outbound_api_key": "k-never-shown",
        "OUTBOND_API_KEY": "k-never-shown",
        "COLLECTOR_OUTBOUND_API_KEY": "k-never-shown",
        "COLLECTOR_XYZZY": "1",
        # Real settings and other programs' variables say nothing.
        "COLLECTOR_PORT": "9001",
        "OUTBOUND_API_KEY": "k-real",
        "PATH": "/usr/bin",
        "HOME": "/root",
    }
    assert unknown_variables(environ) == [
        "COLLECTOR_ALLOWED_ORIGIN is not a setting, so it is ignored; did you mean "
        "COLLECTOR_ALLOWED_ORIGINS?",
        "COLLECTOR_OUTBOUND_API_KEY is not a setting, so it is ignored; did you mean "
        "OUTBOUND_API_KEY?",
        "COLLECTOR_PORTT is not a setting, so it is ignored; did you mean COLLECTOR_PORT?",
        "COLLECTOR_XYZZY is not a setting, so it is ignored (`outbound-collector serve --help` "
        "lists them)",
        "OUTBOND_API_KEY is not a setting, so it is ignored; did you mean OUTBOUND_API_KEY?",
        "OUTBOUND_APIKEY is not a setting, so it is ignored; did you mean OUTBOUND_API_KEY?",
        "outbound_api_key is not a setting, so it is ignored; did you mean OUTBOUND_API_KEY?",
    ]
    assert unknown_variables({"COLLECTOR_PORT": "1", "OUTBOUND_API_KEY": "k"}) == []
