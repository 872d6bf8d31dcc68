"""Compilation: how many programs one inference compiles, and the persistent compilation cache.

The counts come from fresh processes (this one has compiled the pipeline already in other tests):
a child runs one `infer`-equivalent call on the tiny model and reports, as JSON, the programs XLA
compiled or loaded (`count_compilations`) and the raw `jax.monitoring` cache events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from alpamayo_jax import compilation_cache
from alpamayo_jax.compilation_cache import (
    ENV_VAR,
    count_compilations,
    default_cache_dir,
    resolve_cache_dir,
    setup_compilation_cache,
)
from alpamayo_jax.inference.sampling import seed_key, seed_keys

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_ar1_dev"
REPO = Path(__file__).parent.parent
MAX_NEW_TOKENS = 8
# The compiled stages of `sample_from_inputs`: prefill, decode loop, flow matching, rollout.
STAGES = ["jit(_prefill_fn)", "jit(_decode_fn)", "jit(_denoise_fn)", "jit(_rollout_fn)"]
# `Pipeline.prepare` of a clip: resize, normalisation, patches and history tokens in one program.
PREPROCESS = ["jit(_program)"]
MAX_PROGRAMS = 6  # of one `infer` call: preprocessing, prefill, decode loop, flow matching, rollout

# One `infer` call as the CLI makes it (same settings as the warm-up below), in its own process:
# the clip prepared, the key made from the seed, the stages run.
CHILD = f"""
import collections, json, sys
import jax
from alpamayo_jax.compilation_cache import count_compilations, setup_compilation_cache

events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **_: events.update([event]))
cache_dir = setup_compilation_cache()
with count_compilations() as process:
    from alpamayo_jax.inference.inference_config import InferenceConfig
    from alpamayo_jax.inference.pipeline import Pipeline, sample_from_inputs
    from alpamayo_jax.inference.sampling import seed_key
    from alpamayo_jax.processing.synthetic import synthetic_clip

    with count_compilations() as loading:
        pipeline = Pipeline.load({str(FIXTURE / "hf")!r}, processor_dir={str(FIXTURE / "vlm")!r})
    settings = InferenceConfig.from_model(pipeline.config, max_new_tokens={MAX_NEW_TOKENS})
    clip = synthetic_clip(0, image_size=(32, 48))
    with count_compilations() as infer:
        with count_compilations() as preprocess:
            inputs = pipeline.prepare(clip)
        with count_compilations() as seeding:
            key = seed_key(0)
        with count_compilations() as call:
            samples = sample_from_inputs(pipeline, inputs, key, settings)
print(json.dumps({{
    "cache_dir": None if cache_dir is None else str(cache_dir),
    "infer": infer.programs, "preprocess": preprocess.programs, "key": seeding.programs,
    "call": call.programs, "process": process.programs, "load": loading.programs,
    "hits": events["/jax/compilation_cache/cache_hits"],
    "misses": events["/jax/compilation_cache/cache_misses"],
    "xyz": samples.xyz.tolist(),
}}))
"""


def run_child(env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, **env}, cwd=REPO, timeout=600,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def names(programs) -> list[str]:
    return [name for name, _ in programs]


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """`alpamayo-jax warmup` into a fresh cache directory given by --compilation-cache, with the
    environment variable pointing elsewhere and XDG_CACHE_HOME at an empty directory."""
    root = tmp_path_factory.mktemp("cache")
    cache, ignored, xdg = root / "flag", root / "env", root / "xdg"
    done = subprocess.run(
        [sys.executable, "-m", "alpamayo_jax.cli", "warmup", "--model", str(FIXTURE / "hf"),
         "--processor-dir", str(FIXTURE / "vlm"), "--image-size", "32x48",
         "--max-new-tokens", str(MAX_NEW_TOKENS), "--compilation-cache", str(cache)],
        env={**os.environ, ENV_VAR: str(ignored), "XDG_CACHE_HOME": str(xdg)}, cwd=REPO, timeout=600,
        capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return cache, ignored, xdg, done.stdout


def test_warmup_fills_the_flag_directory(warmed):
    cache, ignored, xdg, out = warmed
    entries = list(cache.glob("*-cache"))
    written = {entry.name.rsplit("-", 2)[0] for entry in entries}  # jit__prefill_fn-<key>-cache
    assert {f"jit_{name[4:-1]}" for name in STAGES} <= written, out
    assert not ignored.exists() and not xdg.exists()  # the flag wins over the environment and the default
    assert f"compilation cache: {cache}" in out
    summary = out.splitlines()[-1]
    assert summary.endswith("programs compiled, 0 loaded from the cache"), out
    assert len(entries) >= int(summary.split(": ")[1].split()[0]) >= len(STAGES), out


def test_second_process_compiles_nothing(warmed):
    """A process on the warm-up's cache compiles nothing: every program is a cache hit, nothing is
    written, and the results are the ones a cold process computes."""
    cache, *_ = warmed
    warm = run_child({ENV_VAR: str(cache)})
    assert warm["cache_dir"] == str(cache)
    assert [name for name, hit in warm["process"] if not hit] == [], warm["process"]
    assert warm["misses"] == 0 and warm["hits"] == len(warm["process"]) > len(STAGES), warm
    assert sorted(names(warm["call"])) == sorted(STAGES)
    assert sorted(names(warm["infer"])) == sorted(PREPROCESS + STAGES)
    cold = run_child({ENV_VAR: "off"})
    np.testing.assert_array_equal(np.asarray(warm["xyz"]), np.asarray(cold["xyz"]))


def test_one_call_compiles_its_stages_only(tmp_path):
    """A cold `infer` call compiles at most a handful of programs: preprocessing one (resize,
    normalisation, patches and history tokens of the clip), the key from the seed none, and
    `sample_from_inputs` its four stages and nothing else (no eager op, PRNG split or reshape
    outside them). Loading the checkpoint compiles nothing. With the cache off nothing is
    written, not even the default directory."""
    cold = run_child({ENV_VAR: "off", "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert cold["cache_dir"] is None and not (tmp_path / "xdg").exists()
    assert names(cold["preprocess"]) == PREPROCESS, cold["preprocess"]
    assert cold["key"] == [] and cold["load"] == [], (cold["key"], cold["load"])
    assert names(cold["call"]) == STAGES, cold["call"]
    assert len(cold["infer"]) <= MAX_PROGRAMS, names(cold["infer"])
    assert names(cold["infer"]) == PREPROCESS + STAGES
    assert cold["hits"] == cold["misses"] == 0


@pytest.mark.parametrize("x64", [False, True])
def test_seed_key_is_jax_random_key(x64):
    """The CLI's key (`seed_key`, made on the host, compiling nothing) is `jax.random.key(seed)`
    for every seed that takes: the int64 range, cut to 32 bits unless 64-bit types are on; the
    serving worker's `seed_keys` is the same keys in one array."""
    seeds = [0, 1, 42, -1, -7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, -2**31 - 1,
             2**63 - 1, -2**63]
    with jax.enable_x64(x64):
        with count_compilations() as count:
            keys = [seed_key(seed) for seed in seeds]
        assert count.programs == []
        for seed, key in zip(seeds, keys):
            expected = jax.random.key(seed)
            assert key.dtype == expected.dtype and key.shape == expected.shape == ()
            np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(expected), err_msg=str(seed))
        with count_compilations() as count:
            batch = seed_keys(seeds)
        assert count.programs == [] and batch.shape == (len(seeds),)
        np.testing.assert_array_equal(jax.random.key_data(batch), np.stack([jax.random.key_data(k) for k in keys]))
        with pytest.raises(OverflowError):
            seed_key(2**63)


# ---------------------------------------------------------------------------------------------
# Where the cache lives (in this process; JAX's settings restored afterwards)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def jax_cache_settings(monkeypatch):
    """Leaves this process's persistent-cache settings as it found them."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    monkeypatch.delenv(ENV_VAR, raising=False)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    jax_cache.reset_cache()


def test_precedence(jax_cache_settings, monkeypatch, tmp_path):
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "alpamayo-jax" / "xla"
    assert resolve_cache_dir() == default_cache_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_cache_dir() == Path.home() / ".cache" / "alpamayo-jax" / "xla"
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    assert resolve_cache_dir() == tmp_path / "jax"  # JAX's own setting beats the default
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "flag") == tmp_path / "flag"
    for off in ("off", "OFF", "", " "):
        assert resolve_cache_dir(off) is None
        monkeypatch.setenv(ENV_VAR, off)
        assert resolve_cache_dir() is None
    assert resolve_cache_dir(tmp_path / "flag") == tmp_path / "flag"  # the flag beats the variable's "off"


def test_setup_on_and_off(jax_cache_settings, tmp_path):
    """Programs compiled after `setup_compilation_cache(dir)` land in dir, tiny ones included (even
    after this process has compiled others); after "off" nothing more is written."""
    assert setup_compilation_cache(tmp_path / "xla") == tmp_path / "xla"
    with count_compilations() as count:
        jax.jit(lambda x: x * 3 + 1)(np.arange(7, dtype=np.int32)).block_until_ready()
    assert count.cache_writes == 1 and len(count.compiled) == 1
    written = set((tmp_path / "xla").iterdir())
    assert len(written) == 1
    assert setup_compilation_cache("off") is None
    jax.jit(lambda x: x * 5 - 2)(np.arange(9, dtype=np.int32)).block_until_ready()
    assert set((tmp_path / "xla").iterdir()) == written


def test_unusable_directories(jax_cache_settings, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="compilation cache directory"):
        setup_compilation_cache(blocker / "xla")  # asked for: an error
    monkeypatch.setenv(ENV_VAR, str(blocker / "xla"))
    with pytest.raises(OSError, match="compilation cache directory"):
        setup_compilation_cache()
    monkeypatch.delenv(ENV_VAR)
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with warnings.catch_warnings(record=True) as caught:  # the default: a warning, no cache
        warnings.simplefilter("always")
        assert setup_compilation_cache() is None
    assert any(ENV_VAR in str(w.message) for w in caught)
    assert jax.config.jax_compilation_cache_dir is None
    assert compilation_cache.resolve_cache_dir() == blocker / "alpamayo-jax" / "xla"
