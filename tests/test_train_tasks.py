"""The training package's shape: the import graph, every task's real step, the freeze, the one load path,
and the pre-training teacher's input."""

import ast
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_data2vec import registry
from flax_data2vec.train.config import TrainConfig
from flax_data2vec.train.loop import make_train_step
from flax_data2vec.train.optim import TrainState, make_optimizer
from flax_data2vec.train.task import Task
from flax_data2vec.train.tasks import TASKS, make_task

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flax_data2vec")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported flax_data2vec module, names taken from it)], for the imports run at import time
    (module level; a function-level import such as hub's lazy fairseq dispatch is not an import-time cycle)."""
    graph = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            name = _module_name(path)
            package = name if f == "__init__.py" else name.rpartition(".")[0]
            edges = []
            for node in ast.parse(open(path).read()).body:
                if isinstance(node, ast.Import):
                    edges += [(a.name, []) for a in node.names if a.name.startswith("flax_data2vec")]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parts = package.split(".")
                        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                    if base.startswith("flax_data2vec"):
                        edges.append((base, [a.name for a in node.names]))
            graph[name] = edges
    return graph


def _resolve(target: str, names: list[str], modules: set[str]) -> list[str]:
    """`from package import module` counts as an edge to the module."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return subs or [target]


def test_import_graph_has_no_cycle_and_no_private_names():
    graph = _imports()
    modules = set(graph)
    edges = {m: sorted({t for target, names in e for t in _resolve(target, names, modules) if t in modules and t != m})
             for m, e in graph.items()}
    model_package = [m for m in modules if not m.startswith("flax_data2vec.train")]
    for m in model_package:
        assert not [t for t in edges[m] if t.startswith("flax_data2vec.train")], f"{m} imports the trainer"
    private = [(m, target, n) for m, e in graph.items() for target, names in e for n in names
               if n.startswith("_") and target != m]
    assert not private, f"modules import another module's private names: {private}"
    state = {}

    def visit(m, stack):  # depth-first search; a grey node met again closes a cycle
        state[m] = "grey"
        for t in edges[m]:
            if state.get(t) == "grey":
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(t):] + [t])}")
            if t not in state:
                visit(t, stack + [t])
        state[m] = "black"
    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    assert "flax_data2vec.train.tasks.pretrain" in modules and len(edges["flax_data2vec.train.loop"]) > 3


def test_the_registry_holds_every_core_task():
    assert set(TASKS) >= {"ctc", "audio-classification", "text-classification", "token-classification", "mlm",
                          "pretrain-audio", "pretrain-text"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_takes_a_real_step(tmp_path, name, fast_compile):
    """make_task -> init -> optimizer -> one jitted update -> eval -> export, for every registered task (compile-
    bound: two steps, so compiled with most XLA optimisations off)."""
    tokens = 64 if name == "question-answering" else 16  # QA windows need room for question and context
    cfg = TrainConfig(task=name, batch_size=2, eval_batch_size=4, n_buckets=1, max_text_tokens=tokens,
                      max_steps=10, output_dir=str(tmp_path / name), num_workers=0)
    task = make_task(cfg)
    assert isinstance(task, Task) and dataclasses.is_dataclass(task)
    params = task.init()
    tx, schedule = task.optimizer(params)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0),
                       task.init_extra(params))
    step, batches = jax.jit(make_train_step(task, tx, schedule, 1)), task.train_data()
    new, _ = step(state, next(batches))  # warm-up schedules may start at lr 0: take two steps
    new, metrics = step(new, next(batches))
    assert np.isfinite(float(metrics["loss"])), name
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, new.params)
    assert any(jax.tree_util.tree_leaves(moved)), f"{name}: no parameter changed"
    eval_batch = next(iter(task.eval_data()))
    metrics = task.eval_metrics([jax.device_get(jax.jit(task.eval_step)(new.params, new.extra, eval_batch))])
    assert np.isfinite(metrics["eval_loss"]) and isinstance(metrics["eval_count"], int), (name, metrics)
    module, exported = task.export(jax.device_get(new.params))
    expected = jax.eval_shape(lambda m=module: registry.init_params(m.clone(scan_layers=False)))
    assert jax.tree_util.tree_structure(exported) == jax.tree_util.tree_structure(expected), name


def gated_run(cfg, encoder, gated_steps):
    """cfg's task through `gated_steps` jitted steps and one more, from one init: per encoder weight, unchanged
    through the gated steps; whether the classifier moved in them; per encoder weight, moved after the gate."""
    task = make_task(cfg)
    params = task.init()
    tx, schedule = task.optimizer(params)
    step = jax.jit(make_train_step(task, tx, schedule, 1))
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0), None)
    batches = task.train_data()
    for _ in range(gated_steps):
        state, _ = step(state, next(batches))
    gated = state.params
    state, _ = step(state, next(batches))

    def equal(a, b):
        return [np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    kernel = lambda p: p["classifier"]["out_proj"]["kernel"]  # noqa: E731
    return (equal(params[encoder], gated[encoder]), not np.array_equal(kernel(params), kernel(gated)),
            [not e for e in equal(params[encoder], state.params[encoder])])


def test_frozen_encoder_is_bitwise_unchanged_weight_decay_included(fast_compile):
    """--freeze-encoder-steps: the encoder does not move (decoupled weight decay included), the head does,
    and the encoder's Adam state starts when the gate opens (fairseq's freeze_finetune_updates). Four steps:
    compile-bound, so compiled with most XLA optimisations off."""
    cfg = TrainConfig(task="text-classification", learning_rate=1e-2, weight_decay=0.01, freeze_encoder_steps=3,
                      max_steps=10, batch_size=4, n_buckets=1, max_text_tokens=16)
    frozen, head_moved, moved = gated_run(cfg, "data2vec_text", 3)
    assert all(frozen), "a frozen encoder weight moved"
    assert head_moved
    assert all(moved), "the encoder did not train after the gate opened"

    # the same gate on a bare optax check: with zero gradients, weight decay alone would move a weight
    cfg = dataclasses.replace(cfg, freeze_encoder_steps=2)
    w = {"data2vec_text": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
    tx = make_optimizer(cfg, lambda s: 1e-2, w, lambda path: "delayed" if path[0] == "data2vec_text" else "train")
    opt = tx.init(w)
    for _ in range(2):
        updates, opt = tx.update(jax.tree_util.tree_map(jnp.zeros_like, w), opt, w)
        w = jax.tree_util.tree_map(lambda p, u: p + u, w, updates)
    np.testing.assert_array_equal(w["data2vec_text"]["w"], np.ones(3))
    assert float(w["head"]["w"][0]) < 1.0  # decoupled weight decay acts on the trained head


def test_fine_tuning_merges_the_loaded_encoder_once(tmp_path, capsys):
    """A checkpoint's encoder goes into the task's fresh init in Flax space; the log names new and dropped params;
    the same class keeps its head."""
    import flax_data2vec as fd
    from flax_data2vec.train import models
    cfg = TrainConfig(task="text-classification", batch_size=4, n_buckets=1, max_text_tokens=16, max_steps=4)
    task = make_task(cfg)
    params = task.init()
    module, _ = task.export(params)
    fd.save(tmp_path / "cls", module, params)
    task.save_assets(str(tmp_path / "cls"))

    mlm = models.build(dataclasses.replace(cfg, model=str(tmp_path / "cls")), "Data2VecTextForMaskedLM", {})
    assert "new: " in mlm.note and "lm_head" in mlm.note and "classifier" in mlm.note, mlm.note
    for a, b in zip(jax.tree_util.tree_leaves(params["data2vec_text"]),
                    jax.tree_util.tree_leaves(mlm.params["data2vec_text"])):
        np.testing.assert_array_equal(a, b)
    same = models.build(dataclasses.replace(cfg, model=str(tmp_path / "cls")), type(module).__name__, {})
    assert "new: none" in same.note and "dropped: none" in same.note, same.note
    np.testing.assert_array_equal(same.params["classifier"]["out_proj"]["kernel"],
                                  params["classifier"]["out_proj"]["kernel"])
    base = models.build(dataclasses.replace(cfg, model=str(tmp_path / "cls")), "Data2VecTextModel", {})
    assert "dropped: " in base.note and "classifier" in base.note, base.note


def test_teacher_input_unmasked_or_fairseq_masked(fast_compile):  # compiles only an init: compile-bound
    from flax_data2vec.pretrain_models import text_teacher_input
    ids = jnp.array([[0, 10, 11, 12, 2, 1], [0, 20, 21, 2, 1, 1]])
    attention = (ids != 1).astype(jnp.int32)
    mask = jnp.array([[False, True, False, True, False, False], [False] * 6])
    got_ids, got_mask = text_teacher_input(ids, attention, mask, 1, "unmasked")
    assert (got_ids == ids).all() and (got_mask == attention).all()
    got_ids, got_mask = text_teacher_input(ids, attention, mask, 1, "masked")
    np.testing.assert_array_equal(got_ids[0], [1, 10, 1, 12, 1, 1])  # the original tokens at masked slots only
    np.testing.assert_array_equal(got_mask[0], [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(got_ids[1], ids[1])  # nothing masked: nothing scored, the whole row kept
    np.testing.assert_array_equal(got_mask[1], attention[1])
    with pytest.raises(ValueError, match="teacher_input"):
        text_teacher_input(ids, attention, mask, 1, "both")

    cfg = TrainConfig(task="pretrain-text", teacher_input="masked", batch_size=2, n_buckets=1, max_text_tokens=16)
    task = make_task(cfg)
    assert task.identity["pretrain"]["teacher_input"] == "masked"
    params = task.init()
    batch = {k: jnp.asarray(v) for k, v in next(task.train_data()).items()}
    extra = task.init_extra(params)
    masked = task.loss(params, extra, batch, None, False)[0]
    paper = make_task(dataclasses.replace(cfg, teacher_input="")).loss(params, extra, batch, None, False)[0]
    assert np.isfinite(float(masked)) and float(masked) != float(paper)  # the targets differ


@pytest.mark.usefixtures("private_cache")
def test_a_tokenizer_larger_than_the_checkpoint_vocabulary_is_refused(tmp_path):
    """--tokenizer with more tokens than --model embeds: one error naming both sizes, before any step compiles
    (under jit, ids past the table would read garbage rows)."""
    from conftest import tiny_torch_model

    from flax_data2vec.train import data as data_lib
    tiny_torch_model("Data2VecTextModel").save_pretrained(tmp_path / "ckpt")  # vocab_size 99
    corpus = [f"the quick brown fox jumps over the lazy dog number {i} again and again" for i in range(300)]
    data_lib.build_small_bpe_tokenizer(corpus, vocab_size=400).save_pretrained(tmp_path / "tok")
    cfg = TrainConfig(task="text-classification", model=str(tmp_path / "ckpt"), tokenizer=str(tmp_path / "tok"),
                      output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"has \d+ tokens, but --model .* embeds only 99 \(vocab_size\)"):
        make_task(cfg)
