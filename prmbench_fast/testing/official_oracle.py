"""An independent, plain-Python statement of the official PRMBench evaluator (SPEC §2), used as the test oracle.

Deliberately naive: one Python loop per step, lists of 0/1 entries, sums over lists — the way the official
``evaluate_function`` computes, so that our vectorised evaluator can be checked against it value for value. It
shares no code with the package.
"""

from __future__ import annotations


def avg(xs):
    """The official mean of a list of 0/1 entries (or floats): sum / len, -1 when empty."""
    return sum(xs) / len(xs) if xs else -1


def score_one_sample(error_steps_1based, labels):
    """Per-sample scoring: the labels drive the loop; a correct step is the positive class (label == 1)."""
    errors = [e - 1 for e in error_steps_1based]
    first_error = min(errors) if errors else -1
    correct_list, wrong_list, total_list = [], [], []
    tp = fp = tn = fn = 0
    first_error_acc = None
    for i in range(len(labels)):
        if i == first_error:
            first_error_acc = 1 if labels[i] == 0 else 0
        if i in errors:
            if labels[i] == 1:
                fp += 1
                wrong_list.append(0)
                total_list.append(0)
            else:
                tn += 1
                wrong_list.append(1)
                total_list.append(1)
        else:
            if labels[i] == 1:
                tp += 1
                correct_list.append(1)
                total_list.append(1)
            else:
                fn += 1
                correct_list.append(0)
                total_list.append(0)

    return {
        "correct_step_acc": avg(correct_list),
        "wrong_step_acc": avg(wrong_list),
        "total_step_acc": avg(total_list),
        "first_error_acc": first_error_acc,
        "model_response_acc": sum(labels) / len(labels) if labels else -1,
        "f1_matrix": {"TP": tp, "FP": fp, "TN": tn, "FN": fn},
        "lists": {
            "correct_step_acc": correct_list,
            "wrong_step_acc": wrong_list,
            "total_step_acc": total_list,
            "first_error_acc": [first_error_acc] if first_error_acc is not None else [],
        },
    }


def build_eval_set(raw_rows):
    """The official loader: correct_<idx> from redundency rows (once), then <class>_<idx>, first occurrence wins."""
    samples, seen = [], set()
    for row in raw_rows:
        if row["classification"] == "redundency":
            cid = "correct_" + row["idx"]
            if cid not in seen:
                seen.add(cid)
                samples.append(
                    {"idx": cid, "steps": row["original_process"], "error_steps": [], "classification": "correct"}
                )
        sid = row["classification"] + "_" + row["idx"]
        if sid not in seen:
            seen.add(sid)
            samples.append(
                {"idx": sid, "steps": row["modified_process"], "error_steps": row["error_steps"],
                 "classification": row["classification"]}
            )
    return samples


def _prf(tp, fp, tn, fn):
    p = tp / (tp + fp) if tp + fp != 0 else -1
    r = tp / (tp + fn) if tp + fn != 0 else -1
    f1 = 2 * p * r / (p + r) if p + r != 0 else -1
    np_ = tn / (tn + fn) if tn + fn != 0 else -1
    nr = tn / (tn + fp) if tn + fp != 0 else -1
    nf1 = 2 * np_ * nr / (np_ + nr) if np_ + nr != 0 else -1
    return {"precision": p, "recall": r, "f1": f1, "negative_precision": np_, "negative_recall": nr, "negative_f1": nf1}


def evaluate_official(results, samples, *, subset400=False):
    """The official evaluate_function on result dicts ``{"idx", "scores", ["validity"]}`` (no size assertion).

    ``subset400``: the ``prmtest_classified_subset400`` task's copy of it, which lacks the subtraction of the correct
    predictions from the validity-rate denominator.
    """
    by_id = {s["idx"]: s for s in samples}
    classes = {s["classification"] for s in samples}
    step_metrics = ["correct_step_acc", "wrong_step_acc", "total_step_acc", "first_error_acc"]
    per_class_lists = {m: {c: [] for c in classes} for m in step_metrics + ["similarity"]}
    per_class_counts = {c: {"TP": 0, "FP": 0, "TN": 0, "FN": 0} for c in classes}
    total_lists = {m: [] for m in step_metrics + ["similarity"]}
    total_counts = {"TP": 0, "FP": 0, "TN": 0, "FN": 0}

    kept, seen = [], set()
    for result in results:
        if result["idx"] not in seen and result["idx"] in by_id:
            seen.add(result["idx"])
            kept.append(result)
    correct_results = [r for r in kept if by_id[r["idx"]]["classification"] == "correct"]
    other_results = [r for r in kept if by_id[r["idx"]]["classification"] != "correct"]
    total_num = len(samples) if subset400 else len(samples) - len(correct_results)
    valid_num = 0
    correct_acc = {}
    details = {}

    for r in correct_results:
        if "validity" in r and not r["validity"]:
            continue
        res = score_one_sample(by_id[r["idx"]]["error_steps"], r["scores"]["step_level_validity_labels"])
        for m in step_metrics:
            per_class_lists[m]["correct"].extend(res["lists"][m])
        for k in total_counts:
            per_class_counts["correct"][k] += res["f1_matrix"][k]
        correct_acc[r["idx"]] = res["model_response_acc"]
        details[r["idx"]] = res

    for r in other_results:
        if "validity" in r and not r["validity"]:
            continue
        valid_num += 1
        sample = by_id[r["idx"]]
        cls = sample["classification"]
        if cls in ("redundency", "circular") and "step_level_redundancy_labels" in r["scores"]:
            labels = [not x for x in r["scores"]["step_level_redundancy_labels"]]
        else:
            labels = r["scores"]["step_level_validity_labels"]
        res = score_one_sample(sample["error_steps"], labels)
        for m in step_metrics:
            total_lists[m].extend(res["lists"][m])
            per_class_lists[m][cls].extend(res["lists"][m])
        for k in total_counts:
            per_class_counts[cls][k] += res["f1_matrix"][k]
            total_counts[k] += res["f1_matrix"][k]
        partner = correct_acc.get("correct_" + r["idx"][len(cls + "_"):])
        if partner and res["model_response_acc"] != -1:
            sim = abs(res["model_response_acc"] - partner)
            total_lists["similarity"].append(sim)
            per_class_lists["similarity"][cls].append(sim)
        details[r["idx"]] = res

    totals = {m: avg(total_lists[m]) for m in step_metrics + ["similarity"]}
    totals.update(_prf(total_counts["TP"], total_counts["FP"], total_counts["TN"], total_counts["FN"]))
    per_class = {m: {c: avg(per_class_lists[m][c]) for c in classes} for m in step_metrics + ["similarity"]}
    for m in ["precision", "recall", "f1", "negative_precision", "negative_recall", "negative_f1"]:
        per_class[m] = {}
    for c in classes:
        k = per_class_counts[c]
        for m, v in _prf(k["TP"], k["FP"], k["TN"], k["FN"]).items():
            per_class[m][c] = v
    official = {
        "total_hallucination_results": totals,
        "hallucination_type_results": per_class,
        "validitiy_rate": valid_num / total_num,
    }
    return official, details
