"""Service settings: defaults that keep a checkout clean."""

import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.deployment.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("DSCGUARD_CHECKPOINT_DIR", "DSCGUARD_CACHE_DIR", "DSCGUARD_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_checkpoints_default_to_the_cache_dir_one_folder_per_namespace(clean_env, tmp_path):
    clean_env.setenv("DSCGUARD_CACHE_DIR", str(tmp_path / "cache"))
    assert ServiceSettings().checkpoint_dir == tmp_path / "cache" / "checkpoints" / "dscguard"
    clean_env.setenv("DSCGUARD_NAMESPACE", "tenant-b")
    assert ServiceSettings().checkpoint_dir == tmp_path / "cache" / "checkpoints" / "tenant-b"
    other = ServiceSettings(cache_dir=tmp_path / "other")
    assert other.checkpoint_dir == tmp_path / "other" / "checkpoints" / "tenant-b"


def test_without_a_cache_dir_checkpoints_go_to_the_user_cache_not_the_working_directory(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path / "home"))
    clean_env.chdir(tmp_path)
    directory = ServiceSettings().checkpoint_dir
    assert directory == tmp_path / "home" / ".cache" / "dscguard" / "checkpoints" / "dscguard"
    assert directory.is_absolute()


def test_an_explicit_checkpoint_dir_wins(clean_env, tmp_path):
    clean_env.setenv("DSCGUARD_CACHE_DIR", str(tmp_path / "cache"))
    clean_env.setenv("DSCGUARD_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    assert ServiceSettings().checkpoint_dir == tmp_path / "ckpt"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_a_checkpoints_folder_in_the_checkout_is_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "-q", "checkpoints/step-000000000050/meta.json"], cwd=ROOT)
    assert result.returncode == 0, "/checkpoints/ should be in .gitignore"


def test_the_client_key_is_asked_for_in_one_place_with_what_needs_it():
    from service.deployment.settings import MissingSecretError, ServiceSettings

    with pytest.raises(MissingSecretError, match=r"set DSCGUARD_API_KEY \(the client key\) before starting the stack"):
        ServiceSettings(api_key=None).client_key("the stack")
    assert ServiceSettings(api_key="a-real-secret-0123456789").client_key("the API") == "a-real-secret-0123456789"


def test_a_negative_seed_is_refused_naming_the_setting(clean_env):
    clean_env.setenv("DSCGUARD_SEED", "-1")
    with pytest.raises(ValidationError, match=r"seed\n.*greater than or equal to 0"):
        ServiceSettings()
