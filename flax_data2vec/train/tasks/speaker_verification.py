"""Speaker verification: Data2VecAudioForXVector trained as a speaker classifier with its AM-softmax loss; eval
is the equal error rate of cosine similarity between x-vector embeddings over trial pairs of the eval set.

Speakers: a manifest's `speaker` field or an hf: dataset's --label-column. For the shipped data/speech_digits
the speaker is the espeak voice variant ("en+klatt3" -> "klatt3": 16 speakers, all of them in train and eval,
so the shipped eval verifies seen speakers on unseen utterances); the accent part of the voice string changes
pronunciation, not the voice (README: a long-term spectrum separates variants, not accents). Trials: every pair
of eval utterances (a fixed sample when there are more than MAX_TRIALS pairs); chance EER is 0.5.

AM-softmax alone drives a randomly initialised encoder to its constant-embedding optimum (README); an auxiliary
cross-entropy of a linear probe on the masked mean of the x-vector's projector output (--speaker-probe-weight)
teaches the encoder speakers first. The probe is a training aid: its params sit beside the model's in training
checkpoints and are dropped from the exported model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ... import losses
from ...audio import feature_attention_mask
from .. import data as data_lib
from .. import sources as sources_lib
from ..config import TrainConfig
from ..task import Task
from . import common

MAX_TRIALS = 250_000
TRIAL_SEED = 0
# the tiny preset's x-vector head scaled down with it (the reference's TDNN is 512 wide, 1500 before pooling)
TINY_XVECTOR = dict(tdnn_dim=(128, 128, 128, 128, 384), xvector_output_dim=128)
PROBE = "speaker_probe"  # the auxiliary probe's params, a top-level key beside the module's (flax ignores it)


def speaker_sources(cfg: TrainConfig) -> tuple[sources_lib.Split, sources_lib.Split, str]:
    """(train, eval, key): rows and the row field naming each utterance's speaker."""
    hf = sources_lib.is_hf(cfg.train_data)
    train, evaluation = common.shipped_speech(cfg, need_text=False, need_label=hf)
    key = "label" if hf else "speaker"
    if not cfg.train_data:  # the shipped clips: the voice variant ("en+klatt3" -> "klatt3") is the speaker
        for split in (train, evaluation):
            split.rows = [{**r, "speaker": r["voice"].split("+")[1]} for r in split.rows]
    for split in (train, evaluation):
        missing = sum(1 for r in split.rows if r.get(key) in (None, ""))
        if missing:
            raise ValueError(f"{split.name}: {missing} rows have no {key!r} field (the speaker of each utterance)")
    return train, evaluation, key


def speaker_dataset(rows: list[dict], key: str, label_map: data_lib.LabelMap,
                    max_samples: int) -> tuple[common.LabelledAudio, list[str]]:
    """(audio examples, each one's speaker); labels = (speaker id or -100 for a speaker the classifier does not
    know, example index), so eval can pair utterances by speaker name."""
    audio = data_lib.AudioDataset(rows, max_samples=max_samples)
    speakers = [str(r[key]) for r in audio.rows]
    return common.LabelledAudio(audio, [np.array([label_map.index.get(s, data_lib.IGNORE_INDEX), i], np.int32)
                                        for i, s in enumerate(speakers)]), speakers


def trial_pairs(n: int, max_trials: int = MAX_TRIALS, seed: int = TRIAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) index arrays of trials among n utterances: every pair i < j, or a fixed random sample of them."""
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_trials:
        keep = np.sort(np.random.default_rng(seed).choice(len(i), max_trials, replace=False))
        i, j = i[keep], j[keep]
    return i, j


def equal_error_rate(scores: np.ndarray, targets: np.ndarray) -> float:
    """The rate where false acceptance equals false rejection: the threshold swept down the scores (tied scores
    move together), the crossing interpolated linearly between the two operating points around it."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets, bool)
    if targets.all() or not targets.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    false_reject = 1 - np.r_[0, np.cumsum(targets)[last_of_tie]] / targets.sum()   # falls from 1 to 0
    false_accept = np.r_[0, np.cumsum(~targets)[last_of_tie]] / (~targets).sum()   # rises from 0 to 1
    gap = false_reject - false_accept
    k = int(np.argmax(gap <= 0))  # first operating point at or past the crossing (k >= 1: gap[0] = 1)
    t = gap[k - 1] / (gap[k - 1] - gap[k])
    return float(false_reject[k - 1] + t * (false_reject[k] - false_reject[k - 1]))


def verification_eer(outputs: list[dict], speakers: list[str]) -> tuple[float, int]:
    """(EER, number of trials) of cosine similarity between the eval utterances' embeddings."""
    vectors: dict[int, np.ndarray] = {}
    for o in outputs:
        emb, labels, real = np.asarray(o["embeddings"]), np.asarray(o["labels"]), np.asarray(o["example_mask"])
        for row in np.flatnonzero(real):
            vectors[int(labels[row, 1])] = emb[row]
    index = sorted(vectors)
    emb = np.stack([vectors[k] for k in index]).astype(np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    i, j = trial_pairs(len(index))
    names = np.array([speakers[k] for k in index])
    return equal_error_rate(np.sum(emb[i] * emb[j], axis=1), names[i] == names[j]), len(i)


def make_speaker_verification(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    arch = "Data2VecAudioForXVector"
    train, evaluation, key = speaker_sources(cfg)
    label_map = data_lib.LabelMap.from_labels(r[key] for r in train.rows)
    max_samples = int(cfg.max_audio_seconds * 16000)
    (train_ds, _), (eval_ds, eval_speakers) = (speaker_dataset(s.rows, key, label_map, max_samples)
                                               for s in (train, evaluation))
    train_data, eval_data = common.audio_iterators(cfg, train_ds, eval_ds, shard_index, num_shards)
    changes = {**(TINY_XVECTOR if cfg.model == "tiny" else {}), "id2label": label_map.id2label}
    model = common.audio_model(cfg, arch, changes)
    apply = common.forward(model.module)
    config, weight = model.module.config, cfg.speaker_probe_weight
    probe_init = {"kernel": 0.02 * jax.random.normal(jax.random.PRNGKey(cfg.seed), (config.tdnn_dim[0],
                                                                                     len(label_map))),
                  "bias": jnp.zeros((len(label_map),))}
    model = dataclasses.replace(model, params={**model.params, PROBE: probe_init} if weight else model.params)

    def scored(params, batch, rng, train, probed):
        """Embeddings, the AM-softmax (sum, count, correct) over rows of known speakers, and the probe's
        (sum, correct) on the same rows (zeros when not `probed`)."""
        if probed:  # the projector's output, for the probe
            out, state = apply(params, batch, rng, train, mutable=["intermediates"],
                               capture_intermediates=lambda m, method: m.name == "projector" and method == "__call__")
        else:
            out = apply(params, batch, rng, train)
        labels = common.real_rows(batch["labels"][:, 0], batch["example_mask"])
        total, count = losses.am_softmax_sum(out.logits, params["objective"], labels)
        known = labels >= 0
        predicted = jnp.argmax(losses.cosine_scores(out.logits, params["objective"]), -1)
        probe_sum = probe_correct = jnp.zeros(())
        if probed:
            projected = state["intermediates"]["projector"]["__call__"][0]
            frames = feature_attention_mask(config, batch["attention_mask"], projected.shape[1])[:, :, None]
            pooled = jnp.where(frames, projected, 0).sum(1) / jnp.maximum(frames.sum(1), 1)
            probe_logits = pooled @ params[PROBE]["kernel"] + params[PROBE]["bias"]
            probe_sum, _ = losses.cross_entropy_sum(probe_logits, labels)
            probe_correct = ((jnp.argmax(probe_logits, -1) == labels) & known).sum()
        return out.embeddings, (total, count, ((predicted == labels) & known).sum()), (probe_sum, probe_correct)

    def loss(params, extra, batch, rng, train):
        _, (total, count, correct), (probe_sum, probe_correct) = scored(params, batch, rng, train, PROBE in params)
        denominator = jnp.maximum(count, 1.0)
        metrics = {"accuracy": correct / denominator, "am_softmax": total / denominator}
        if PROBE in params:
            metrics.update(probe_loss=probe_sum / denominator, probe_accuracy=probe_correct / denominator)
        return total + weight * probe_sum, count, metrics

    def eval_step(params, extra, batch):
        embeddings, (total, count, correct), _ = scored(params, batch, None, False, False)  # eval scores embeddings
        return {"loss_sum": total, "count": count, "correct": correct, "embeddings": embeddings,
                "labels": batch["labels"], "example_mask": batch["example_mask"]}

    def eval_metrics(outputs):
        eer, trials = verification_eer(outputs, eval_speakers)
        metrics = common.classification_eval(outputs)  # eval_loss / eval_accuracy: eval rows of train speakers
        return {**metrics, "eval_eer": eer, "eval_trials": trials}

    def export(params):
        return model.module, {k: v for k, v in params.items() if k != PROBE}

    seen = len(set(eval_speakers) & set(label_map.names))
    return common.fine_tuning_task(cfg, arch, model, (train, evaluation), (train_data, eval_data), (loss, eval_step),
                                   eval_metrics, lr=1e-3, best=("eval_eer", "min"),
                                   data_detail=f"; {len(label_map)} train speakers, {seen} of the "
                                               f"{len(set(eval_speakers))} eval speakers among them",
                                   export=export)
