"""doit over the tiny model: build, no-op, tweaks, explain, concurrency, failures."""
from __future__ import annotations

import json
import re
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import fake_hf_cache

from pipeline.engine.store import Store, remove_tree


def built(out: str) -> list[str]:
    return re.findall(r"kiln: \S+:(\S+): built ", out)


def test_build_then_noop_then_comment_edit(tiny_project):
    first = tiny_project.doit("recipe=tiny")
    assert built(first.stdout) == ["model", "bundle"]
    assert "kiln: bundle ready:" in first.stdout
    ws = tiny_project.artifacts / "tiny"
    manifest = json.loads((ws / "bundle" / "to_device" / "manifest.json").read_text())
    assert "model/model.safetensors" in manifest["files"] and len(manifest["files"]["model/model.safetensors"]["sha256"]) == 64
    with tarfile.open(ws / "bundle" / "tiny.tar.gz") as tar:
        names = tar.getnames()
        assert "tiny/manifest.json" in names and "tiny/model/config.json" in names
        assert {m.mtime for m in tar.getmembers()} == {946684800} and {m.uid for m in tar.getmembers()} == {0}
    summary = json.loads((ws / "model" / "summary.json").read_text())
    assert summary["num_layers"] == 2 and summary["num_kv_heads"] == 2 and summary["hidden_size"] == 64

    second = tiny_project.doit("recipe=tiny")
    assert built(second.stdout) == [] and "-- tiny:model" in second.stdout and "-- tiny:bundle" in second.stdout

    text = (tiny_project.recipes / "tiny.yaml").read_text()
    (tiny_project.recipes / "tiny.yaml").write_text("# a new comment\n" + text.replace("description:", "# x\ndescription:"))
    third = tiny_project.doit("recipe=tiny")
    assert built(third.stdout) == []


@pytest.mark.slow
def test_tweak_reruns_downstream_only_and_explain_names_it(tiny_project):
    tiny_project.doit("recipe=tiny")
    recipe = tiny_project.recipes / "tiny.yaml"
    recipe.write_text(recipe.read_text().replace("compress_level: 1", "compress_level: 2"))
    explain = tiny_project.doit("explain", "recipe=tiny").stdout
    assert re.search(r"tiny:model \[\w+…\]: up to date", explain)
    assert re.search(r"tiny:bundle \[\w+…\]: will run: params.compress_level: 1 → 2", explain)
    out = tiny_project.doit("recipe=tiny").stdout
    assert built(out) == ["bundle"]

    recipe.write_text(recipe.read_text() + "model: {dtype: bfloat16}\n")
    explain = tiny_project.doit("explain", "recipe=tiny").stdout
    assert 'tiny:model' in explain and 'params.dtype: "float32" → "bfloat16"' in explain
    assert "tiny:bundle: depends on the output of model, not built yet; kept if model comes out as before" in explain
    assert built(tiny_project.doit("recipe=tiny").stdout) == ["model", "bundle"]
    summary = json.loads((tiny_project.artifacts / "tiny" / "model" / "summary.json").read_text())
    assert summary["dtype"] == "bfloat16"


def test_store_is_shared_between_recipes(tiny_project):
    tiny_project.doit("recipe=tiny")
    tiny_project.write("tiny2.yaml", "extends: tiny\ndescription: other\n")
    out = tiny_project.doit("recipe=tiny2").stdout
    assert built(out) == ["bundle"]  # its model entry is the same key: linked, not rebuilt
    assert "kiln: tiny2:model: hit" in out


def test_parallel_doit_n2_and_two_concurrent_runs_build_each_key_once(tiny_project):
    procs = [tiny_project.popen_doit("-n", "2", "recipe=tiny") for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(b for o in outs for b in built(o)) == ["bundle", "model"], outs
    assert all("kiln: bundle ready:" in o for o in outs)
    assert len(list(Store(tiny_project.store).outputs())) == 2 and len(list(Store(tiny_project.store).actions())) == 2


def test_recipe_error_exits_nonzero_without_traceback(tiny_project):
    tiny_project.write("bad.yaml", "extends: tiny\ncontext_length: many\n")
    proc = tiny_project.doit("recipe=bad", check=False)
    assert proc.returncode != 0
    assert "bad.yaml:2: context_length: Input should be a valid integer" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tiny_project.store / "outputs").exists()


def test_unknown_recipe_lists_recipes(tiny_project):
    proc = tiny_project.doit("recipe=tinny", check=False)
    assert proc.returncode != 0 and "unknown recipe 'tinny' (did you mean 'tiny'?)" in proc.stderr


def test_failing_stage_names_log_and_leaves_nothing(tiny_project, tmp_path):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    tiny_project.write("broken.yaml", f"extends: tiny\nmodel: {{hf_dir: {broken}}}\n")
    proc = tiny_project.doit("recipe=broken", check=False)
    assert proc.returncode != 0
    assert "broken:model failed (exit 1)" in proc.stdout + proc.stderr
    log = tiny_project.artifacts / "broken" / "logs" / "model.failed.log"
    assert log.is_file() and "Traceback" in log.read_text()
    assert list(Store(tiny_project.store).outputs()) == [] and list(Store(tiny_project.store).actions()) == []
    assert not list((tiny_project.store / "scratch").iterdir())
    assert not (tiny_project.artifacts / "broken" / "model").exists()


def test_model_not_on_machine_fails_at_model_stage_with_instructions(project):
    project.write("gated.yaml", "model: {name: x, hub_id: nobody/absent-model}\ntarget: x86_64\nscheme: fp32\n")
    assert "gated:model" in project.doit("list", "recipe=gated").stdout
    proc = project.doit("recipe=gated", check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "gated:model: cannot run here" in text and "hf download nobody/absent-model" in text


def test_hub_id_resolves_offline_from_hf_cache(project, tiny_model_dir, tmp_path, monkeypatch):
    from pipeline.engine.plan import plan
    from pipeline.registry import load_recipe

    hub = tmp_path / "hub"
    fake_hf_cache(hub, "someorg/tiny", "model", {f.name: f.read_bytes() for f in tiny_model_dir.iterdir()})
    project.write("hub.yaml", "model: {name: tiny, hub_id: someorg/tiny}\ntarget: x86_64\nscheme: fp32\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    spec = plan(load_recipe("hub", project.settings(monkeypatch)))[0]
    assert spec.blocked is None and spec.source_paths["weights"].endswith("snapshots/" + "0123456789abcdef" * 2 + "01234567")
    out = project.doit("recipe=hub", HF_HUB_CACHE=str(hub)).stdout
    assert built(out) == ["model", "bundle"]
    summary = json.loads((project.artifacts / "hub" / "model" / "summary.json").read_text())
    assert summary["num_layers"] == 2


@pytest.mark.slow
def test_verify_quarantine_then_rebuild_relinks_the_workspace(tiny_project):
    """An entry found corrupted is quarantined; the rebuild under the same key must replace the
    workspace's files (which were links to the corrupted ones), not keep them."""
    tiny_project.doit("recipe=tiny")
    ws_file = tiny_project.artifacts / "tiny" / "model" / "config.json"
    good = ws_file.read_text()
    entry_file = next(tiny_project.store.glob("outputs/*/*/out/config.json"))
    entry_file.chmod(0o644)
    entry_file.write_text("{}")  # bit rot in the store (and in every hard link of it)
    proc = tiny_project.doit("verify", "recipe=tiny", check=False)
    assert proc.returncode != 0 and "MISMATCH in config.json" in proc.stdout
    out = tiny_project.doit("recipe=tiny").stdout
    assert "model" in built(out)
    assert ws_file.read_text() == good


def test_run_tool_echo_shows_a_long_tools_output_as_it_comes_and_keeps_it(capfd):
    from pipeline.engine.proc import run_tool

    script = "import sys, time; print('[1]12.5,', end='', flush=True); time.sleep(0.2); sys.stderr.write('ETA 0.1 min\\n')"
    done = run_tool([sys.executable, "-c", script], capture=True, echo=True)
    assert done.stdout == "[1]12.5,ETA 0.1 min\n"
    assert capfd.readouterr().out.endswith("[1]12.5,ETA 0.1 min\n")


@pytest.mark.parametrize("edit", ["append", pytest.param("truncate", marks=pytest.mark.slow),
                                  pytest.param("replace_same_size", marks=pytest.mark.slow)])
def test_an_edited_workspace_file_is_noticed_quarantined_and_rebuilt(tiny_project, edit):
    """Workspace files are hard links into the store. An edit through one changes the entry: the
    next build must notice it without rehashing (size, mtime, inode), quarantine the entry, build
    again, and ship only bytes the manifest vouches for — the same tarball as a clean build."""
    import os

    tiny_project.doit("recipe=tiny")
    tarball = tiny_project.artifacts / "tiny" / "bundle" / "tiny.tar.gz"
    clean = tarball.read_bytes()
    ws_file = tiny_project.artifacts / "tiny" / "model" / "config.json"
    assert os.stat(ws_file).st_nlink > 1  # a hard link into the entry
    good = ws_file.read_bytes()
    ws_file.chmod(0o644)
    if edit == "append":
        with open(ws_file, "ab") as f:
            f.write(b"\n")
    elif edit == "truncate":
        os.truncate(ws_file, 10)
    else:  # same size, mtime put back: only the inode of a replacement can tell
        st = os.stat(ws_file)
        replacement = ws_file.with_name("config.json.new")
        replacement.write_bytes(good.replace(b"{", b"[", 1))
        os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(replacement, ws_file)
    entry = json.loads((ws_file.parent / ".kiln-entry.json").read_text())["entry"]
    out = tiny_project.doit("recipe=tiny").stdout
    if edit == "replace_same_size":  # the entry is intact (the link was broken, not written through)
        assert "model: hit" in out and "model" not in built(out)
    else:
        assert re.search(r"tiny:model: config\.json changed since the output was published .*moved to "
                         r".*quarantine", out)
        assert "model" in built(out) and (tiny_project.store / "quarantine" / Path(entry).name).is_dir()
    assert ws_file.read_bytes() == good and tarball.read_bytes() == clean
    assert ": built" not in tiny_project.doit("recipe=tiny").stdout  # and then it is quiet again


def test_a_bundle_refuses_to_pack_bytes_its_inputs_manifest_does_not_vouch_for(tiny_project):
    """Even if an input entry changed in a way its stat signature cannot show, the bundle rehashes
    what it packs against the manifest and fails rather than ship it."""
    import os

    tiny_project.doit("recipe=tiny")
    entry_file = next(tiny_project.store.glob("outputs/*/*/out/config.json"))
    st = os.stat(entry_file)
    entry_file.chmod(0o644)
    data = entry_file.read_bytes()
    with open(entry_file, "r+b") as f:  # same size, same inode, mtime put back: only the bytes tell
        f.write(data[:1].swapcase() if data[:1].isalpha() else b" ")
    os.utime(entry_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    bundle_entry = json.loads((tiny_project.artifacts / "tiny" / "bundle" / ".kiln-entry.json").read_text())["entry"]
    remove_tree(Path(bundle_entry))  # force the bundle to be packed again
    proc = tiny_project.doit("recipe=tiny", check=False)
    assert proc.returncode != 0 and "bundle: model's entry does not match its manifest (config.json)" in proc.stdout
