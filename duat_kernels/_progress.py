"""Progress of loops over batch elements that differ (each one a kernel call): a bar once they take long."""

from __future__ import annotations

# A loop over at least PROGRESS_FROM_ELEMENTS batch elements shows a progress bar once it has run PROGRESS_AFTER_S
# seconds (a tqdm bar costs ~30 µs to set up: a smaller batch loops without one).
PROGRESS_FROM_ELEMENTS = 1000
PROGRESS_AFTER_S = 2.0


def batch_elements(batch: int, what: str):
    """range(batch) for a loop over batch elements that differ, with a tqdm bar (described by `what`) once a loop
    over PROGRESS_FROM_ELEMENTS elements or more has run for PROGRESS_AFTER_S seconds (10^6 elements of 40 µs each
    ran silently for a minute)."""
    if batch < PROGRESS_FROM_ELEMENTS:
        return range(batch)
    from tqdm.auto import tqdm

    return tqdm(range(batch), desc=what, unit="element", delay=PROGRESS_AFTER_S, leave=False)
