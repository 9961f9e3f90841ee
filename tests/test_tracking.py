"""W&B: offline without credentials, and the API key never in a runtime_env (Ray keeps those in the GCS and shows
them on the dashboard); deploy/wandb_netrc.py puts a secret-store key into ~/.netrc."""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import pathlib
import stat

import pytest

from protopo_ray.search import tracking

REPO = pathlib.Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home directory without ~/.netrc and an environment without W&B settings."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_offline_without_credentials(home):
    assert not tracking.has_wandb_credentials()
    assert tracking.wandb_mode() == "offline"


def test_online_with_a_netrc_login(home):
    netrc_file = home / ".netrc"
    netrc_file.write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    netrc_file.chmod(0o644)
    assert tracking.wandb_mode() == "offline"  # a password file others can read is refused (as `netrc` does)
    netrc_file.chmod(0o600)
    assert tracking.wandb_mode() == "online"


def test_disabled_returns_no_callback():
    assert tracking.wandb_callbacks(enabled=False, project="p", experiment="e", stage="s",
                                    log_dir=pathlib.Path("unused")) == []


class FakeTrial:
    local_path = "/nonexistent/trial_0"


class FakeRemoteClass:
    """What `ray.remote(**options)(cls)` returns, recording the options and the actor's constructor arguments."""

    def __init__(self, options: dict, cls: type):
        self.options, self.cls, self.created = options, cls, []

    def remote(self, **kwargs):
        self.created.append(kwargs)
        return type("Handle", (), {"run": type("Run", (), {"remote": staticmethod(lambda: object())})})()


@pytest.fixture
def fake_ray_remote(monkeypatch):
    """Replace the Ray calls the logging callback makes when it starts a trial's logging actor."""
    import ray
    import ray.air.integrations.wandb as ray_wandb

    made: list[FakeRemoteClass] = []

    def remote(**options):
        def wrap(cls):
            made.append(FakeRemoteClass(options, cls))
            return made[-1]
        return wrap

    monkeypatch.setattr(ray, "remote", remote)
    monkeypatch.setattr(ray_wandb, "Queue", lambda **kwargs: object())
    monkeypatch.setattr(ray_wandb, "_force_on_current_node", lambda: {})
    return made


def forget_fake_actors(callback) -> None:
    """Nothing to stop: drop the fake actors before the callback's __del__ tries to."""
    for fakes in (callback._trial_logging_actors, callback._trial_logging_futures, callback._logging_future_to_trial,
                  callback._trial_queues):
        fakes.clear()


def test_logging_actors_runtime_env_never_holds_the_key(home, fake_ray_remote, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    [callback] = tracking.wandb_callbacks(enabled=True, project="p", experiment="e", stage="s",
                                          log_dir=home / "wandb")
    callback.setup()
    callback._start_logging_actor(FakeTrial(), [], name="trial_0")
    [actor_class] = fake_ray_remote
    # Stock Ray would put {"env_vars": {"WANDB_API_KEY": KEY}} here.
    assert KEY not in json.dumps(actor_class.options, default=str)
    assert "WANDB_API_KEY" not in json.dumps(actor_class.options.get("runtime_env", {}))
    # The actor gets a path instead, to a file only this user can read; the driver keeps its key.
    [kwargs] = actor_class.created
    key_file = pathlib.Path(kwargs["api_key_file"])
    assert KEY not in json.dumps(kwargs, default=str)
    assert key_file.read_text() == KEY and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert os.environ["WANDB_API_KEY"] == KEY
    # The stage's end removes the file.
    monkeypatch.setattr(type(callback).__mro__[1], "on_experiment_end", lambda self, trials, **info: None)
    callback.on_experiment_end([])
    assert not key_file.exists()
    forget_fake_actors(callback)


def test_logging_actor_reads_the_key_file_into_its_own_environment(home, monkeypatch):
    key_file = tracking.write_private_key_file(KEY)
    actor_class = tracking.logger_callback_class()._logger_actor_cls
    monkeypatch.chdir(home)  # the actor changes into its log directory
    actor_class(str(home), queue=None, exclude=[], to_config=[], api_key_file=str(key_file), name="trial_0")
    assert os.environ.pop("WANDB_API_KEY") == KEY
    key_file.unlink()


def test_offline_writes_no_key_file(home, fake_ray_remote):
    [callback] = tracking.wandb_callbacks(enabled=True, project="p", experiment="e", stage="s",
                                          log_dir=home / "wandb")
    callback.setup()
    callback._start_logging_actor(FakeTrial(), [], name="trial_0")
    assert fake_ray_remote[0].created[0]["api_key_file"] is None
    forget_fake_actors(callback)


def test_warns_when_the_job_was_submitted_with_the_key_in_its_runtime_env(monkeypatch):
    import ray

    context = type("Context", (), {"runtime_env": {"env_vars": {"WANDB_API_KEY": KEY}}})()
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with pytest.warns(UserWarning, match="runtime_env"):
        tracking.warn_if_key_in_job_runtime_env()


def load_wandb_netrc():
    spec = importlib.util.spec_from_file_location("wandb_netrc", REPO / "deploy" / "wandb_netrc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def aws(monkeypatch):
    from moto import mock_aws

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-west-2"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield


def test_wandb_netrc_writes_the_secret_for_this_user_only(home, aws):
    import boto3

    boto3.client("secretsmanager", region_name="us-west-2").create_secret(Name="protopo-ray/wandb-api-key",
                                                                          SecretString=KEY + "\n")
    (home / ".netrc").write_text("machine example.org\n  login me\n  password other\n")
    assert load_wandb_netrc().main(["--aws-secret", "protopo-ray/wandb-api-key", "--region", "us-west-2"]) == 0
    netrc_file = home / ".netrc"
    assert stat.S_IMODE(netrc_file.stat().st_mode) == 0o600
    hosts = netrc.netrc(str(netrc_file)).hosts
    assert hosts["api.wandb.ai"][2] == KEY and hosts["example.org"] == ("me", "", "other")
    assert tracking.wandb_mode() == "online"


def test_wandb_netrc_without_a_secret_leaves_wandb_offline(home, aws):
    assert load_wandb_netrc().main(["--aws-secret", "protopo-ray/wandb-api-key", "--region", "us-west-2"]) == 0
    assert not (home / ".netrc").exists()
    assert tracking.wandb_mode() == "offline"


@pytest.mark.ray
def test_key_file_reaches_a_real_logging_actor_on_the_drivers_node(ray_cluster, home):
    import ray

    class ProbeActor(tracking.logger_callback_class()._logger_actor_cls):
        def key(self) -> str | None:
            return os.environ.get("WANDB_API_KEY")

    key_file = tracking.write_private_key_file(KEY)
    try:
        actor = ray.remote(num_cpus=0)(ProbeActor).remote(str(home), queue=None, exclude=[], to_config=[],
                                                          api_key_file=str(key_file))
        assert ray.get(actor.key.remote(), timeout=120) == KEY
        ray.kill(actor)
    finally:
        key_file.unlink()
