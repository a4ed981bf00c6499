"""Sweeps: grids over any fields, shapes included, packed into as few models as the shapes allow.

A spec's ``[sweep]`` section lists axes over any dotted field. The grid expands into *points* (product by default,
``zip`` groups advance together), ``where`` conditions drop points, and each point is validated as an ordinary
experiment. Points whose experiments differ only in settings that keep tensor shapes (``INSTANCE_AXES``) form a
*group* that trains as ONE model: every (point, repeat) of the group is one instance, the settings that differ become
zipped instance axes and the repeats a ``seed`` axis. Groups larger than the memory budget are split.

The sweep folder::

    OUT/sweep.json             the spec and the plan (points, groups) -- the source of truth for resuming
    OUT/runs/<group>/          one ordinary run folder per group (``load_run`` opens it), renamed into place when done
    OUT/errors/<group>.json    the one-line error of a group that failed (retried by the next run)
    OUT/results.parquet        one row per point: axis values, status, losses over the repeats, metrics
    OUT/report.html            heatmaps, line plots, threshold read-out, the results table

A group is done exactly when its run folder exists (``runs.run`` builds it in a hidden ``.partial`` sibling and
renames it), so a killed sweep resumes by skipping done groups, and the results table depends only on the plan and
the finished run folders. The figure helpers at the end are pure functions of the results table.

The package by role (each layer imports only those above it)::

    plan.py      conditions, the grid's points, groups (packing), Plan, make_plan, describe_plan, estimates
    folder.py    the folder format: sweep.json, prepare / read_plan, when a group is done, collect_results, load_sweep
    report.py    report axes, heatmaps, line plots, threshold tables, training geometry, render_sweep
    execute.py   run_group, the picklable ``_task``, the local pool / Ray / SLURM backends, execute
"""

from __future__ import annotations

from superposition.folder import RunFormatError
from superposition.sweep.execute import (
    BACKENDS,
    GroupOutcome,
    SweepOutcome,
    execute,
    physical_cores,
    run_group,
)
from superposition.sweep.folder import (
    ERRORS,
    FORMAT,
    MAX_COMBINATIONS,
    MAX_PLANNED_INSTANCES,
    MAX_SPEC_DEPTH,
    MAX_SWEEP_BYTES,
    REPORT,
    RESULTS,
    RUNS,
    SWEEP_JSON,
    Sweep,
    collect_results,
    group_done,
    load_sweep,
    prepare,
    read_plan,
)
from superposition.sweep.plan import (
    SEED_STRIDE,
    Condition,
    Group,
    Operand,
    Plan,
    Point,
    combinations,
    describe_plan,
    estimate_memory,
    make_plan,
    parse_condition,
)
from superposition.sweep.report import (
    TrainingGeometry,
    heatmap_figure,
    lines_figure,
    pick_sizes,
    render_sweep,
    report_axes,
    sweep_verdict,
    threshold_display,
    threshold_table,
    training_geometry_data,
    write_sweep_report,
)

__all__ = [
    "group_done",
    "sweep_verdict",
    "Condition",
    "parse_condition",
    "combinations",
    "Point",
    "Group",
    "Plan",
    "make_plan",
    "describe_plan",
    "estimate_memory",
    "prepare",
    "read_plan",
    "GroupOutcome",
    "run_group",
    "SweepOutcome",
    "execute",
    "physical_cores",
    "collect_results",
    "Sweep",
    "load_sweep",
    "heatmap_figure",
    "lines_figure",
    "threshold_table",
    "render_sweep",
    "BACKENDS",
    # also re-exported: the folder's names and constants, and helpers the command line and tests use
    "RunFormatError",
    "ERRORS",
    "FORMAT",
    "MAX_COMBINATIONS",
    "MAX_PLANNED_INSTANCES",
    "MAX_SPEC_DEPTH",
    "MAX_SWEEP_BYTES",
    "REPORT",
    "RESULTS",
    "RUNS",
    "SWEEP_JSON",
    "SEED_STRIDE",
    "Operand",
    "TrainingGeometry",
    "pick_sizes",
    "report_axes",
    "threshold_display",
    "training_geometry_data",
    "write_sweep_report",
]
