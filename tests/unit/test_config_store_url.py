"""`store.url` (PROTOCOL.md section 7): "" = SQLite, a postgresql:// URL = PostgreSQL; anything else,
and `store.max_bytes` together with PostgreSQL, is refused naming the key (exit 2 at start)."""
from __future__ import annotations

import pytest

from pairlane import config as cfgmod
from pairlane.config import ConfigError
from pairlane.stores import backend


def load(tmp_path, text: str) -> dict:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return cfgmod.load(str(path))


def test_default_is_sqlite(tmp_path):
    cfg = load(tmp_path, "")
    assert cfg["store"]["url"] == "" and backend(cfg) == "sqlite"


@pytest.mark.parametrize("url", ["postgresql://u@127.0.0.1:5432/db", "postgres://u:secret@db.example/x",
                                 "postgresql:///pairlane"])
def test_postgresql_urls_select_postgresql(tmp_path, url):
    cfg = load(tmp_path, f'[store]\nurl = "{url}"\n')
    assert backend(cfg) == "postgresql" and cfg["store"]["url"] == url


@pytest.mark.parametrize("url", ["mysql://u@h/db", "/var/lib/pairlane.db", "postgresql://u@h:notaport/db",
                                 "postgresql://u@h/db?bogus_option=1"])
def test_bad_url_is_refused_naming_the_key(tmp_path, url):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f'[store]\nurl = "{url}"\n')
    assert "'store.url'" in str(info.value)


def test_max_bytes_with_postgresql_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[store]\nurl = "postgresql://u:secret@127.0.0.1/db"\nmax_bytes = 1000000\n')
    msg = str(info.value)
    assert "'store.max_bytes'" in msg and "PostgreSQL" in msg and "secret" not in msg


def test_wrong_type_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "[store]\nurl = 5\n")
    assert "'store.url'" in str(info.value)
