"""PRMBench classes, their leaderboard abbreviations and domains (PRMBench paper; SPEC §1.3)."""

from __future__ import annotations

#: The synthetic class of the clean ``correct_<idx>`` solutions the official loader adds (never in the totals).
CORRECT = "correct"

#: The nine classes as spelled in the data, in leaderboard column order, with their abbreviations.
CLASS_ABBREVIATIONS = {
    "redundency": "NR",  # (sic) the data's spelling
    "circular": "NCL",
    "counterfactual": "ES",
    "step_contradiction": "SC",
    "domain_inconsistency": "DC",
    "confidence": "CI",
    "missing_condition": "PS",
    "deception": "DR",
    "multi_solutions": "MS",
}
ERROR_CLASSES = tuple(CLASS_ABBREVIATIONS)

#: Domains in leaderboard order; the domain score is the mean of its (clamped) class scores.
DOMAINS = {
    "S1": ("redundency", "circular"),  # Simplicity
    "S2": ("counterfactual", "step_contradiction", "domain_inconsistency", "confidence"),  # Soundness
    "S3": ("missing_condition", "deception", "multi_solutions"),  # Sensitivity
}
DOMAIN_NAMES = {"S1": "simplicity", "S2": "soundness", "S3": "sensitivity"}
CLASS_DOMAIN = {cls: DOMAIN_NAMES[key] for key, members in DOMAINS.items() for cls in members}

#: Classes whose official score is NOT(redundancy label) when a prediction carries redundancy labels (SPEC §2.3).
REDUNDANCY_CLASSES = ("redundency", "circular")

#: Only redundency rows create the clean ``correct_<idx>`` samples (SPEC §1.4).
CORRECT_SOURCE_CLASS = "redundency"

#: Class ids used by the counting op: the correct class first, then the nine classes in column order.
ALL_CLASSES = (CORRECT,) + ERROR_CLASSES
CLASS_ID = {cls: i for i, cls in enumerate(ALL_CLASSES)}
