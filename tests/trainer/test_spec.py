import json
import time

import pytest
from pydantic import ValidationError

from trainer.spec import (
    MAX_BLOCKS,
    MAX_BLOCKS_PER_STAGE,
    PRESETS,
    JobSpec,
    ModelSpec,
    error_list,
    model_cost,
    parse_override,
    resolve,
    short,
)


def fields(exc: ValidationError) -> set[str]:
    return {e["field"] for e in error_list(exc)}


def test_defaults_are_the_paper_recipe():
    # The paper preset is the field defaults plus what the text says about the data: all 50,000 images
    # (no validation split) with the test split every epoch.
    assert resolve("paper") == JobSpec().model_copy(
        update={"data": JobSpec().data.model_copy(update={"val_fraction": 0.0})}
    )
    spec = resolve("paper")
    assert spec.model.widths == [32, 64, 256, 256] and spec.model.blocks == [2, 2, 2, 2]
    assert (spec.optim.lr, spec.optim.momentum, spec.optim.weight_decay) == (0.05, 0.9, 1e-3)
    assert (spec.optim.label_smoothing, spec.optim.batch_size, spec.optim.epochs) == (0.1, 512, 200)
    assert (spec.schedule.kind, spec.schedule.t0, spec.schedule.t_mult) == ("cosine_warm_restarts", 10, 2)


def test_presets_resolve_with_overrides():
    spec = resolve("debug", {"optim.epochs": 3, "model.dropout": 0.2})
    assert spec.optim.epochs == 3 and spec.model.dropout == 0.2
    assert spec.model.widths == PRESETS["debug"]["model"]["widths"]
    # the resolved spec round-trips through JSON unchanged (what the worker re-validates)
    assert JobSpec.model_validate_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"optim.lr": 0}, "optim.lr"),
        ({"optim.lr": "fast"}, "optim.lr"),
        ({"optim.batch_size": 63}, "optim.batch_size"),  # not divisible by 2 workers
        ({"model.blocks": [1, 1, 1]}, "model.blocks"),  # 4 widths, 3 stages
        ({"model.se_reduction": 64}, "model.se_reduction"),
        ({"data.val_fraction": 0.7}, "data.val_fraction"),
        ({"data.max_train_images": 10}, "data.max_train_images"),
        ({"schedule.kind": "step"}, "schedule.kind"),
        ({"optim.learning_rate": 0.1}, "optim.learning_rate"),  # extra="forbid"
        ({"precision": "fp16"}, "precision"),
        ({"scaling.num_workers": 0}, "scaling.num_workers"),
        ({"model.dropout": 1.0}, "model.dropout"),
    ],
)
def test_errors_name_their_field(overrides, field):
    with pytest.raises(ValidationError) as info:
        resolve("debug", overrides)
    assert field in fields(info.value), error_list(info.value)


def test_unknown_preset():
    with pytest.raises(ValidationError) as info:
        resolve("huge")
    assert fields(info.value) == {"preset"}
    assert "debug" in error_list(info.value)[0]["message"]


def test_search_algorithms_take_the_distributions_they_can_search():
    space = {"optim.lr": {"loguniform": [1e-3, 0.5]}, "model.dropout": {"choice": [0.0, 0.2]}}
    assert resolve("debug", {"search": {"algorithm": "optuna", "space": space}}).search.algorithm == "optuna"
    assert resolve("debug", {"search": {"space": space}}).search.algorithm == "random"
    with pytest.raises(ValidationError) as info:
        resolve("debug", {"search": {"algorithm": "optuna", "space": {**space, "optim.epochs": {"grid": [1, 2]}}}})
    assert fields(info.value) == {"search.space.optim.epochs"}
    assert "use choice instead of grid" in error_list(info.value)[0]["message"]
    with pytest.raises(ValidationError) as info:
        resolve("debug", {"search": {"algorithm": "grid", "space": space}})
    assert fields(info.value) == {"search.space.optim.lr", "search.space.model.dropout"}


def test_search_paths_are_checked_against_the_schema():
    ok = resolve(
        "debug",
        {
            "search": {
                "space": {"optim.lr": {"loguniform": [1e-3, 0.5]}, "schedule.kind": {"choice": ["cosine", "onecycle"]}}
            }
        },
    )
    assert ok.search.num_samples == 4
    with pytest.raises(ValidationError) as info:
        resolve(
            "debug",
            {
                "search": {
                    "space": {
                        "optim.nope": {"grid": [1, 2]},
                        "model.dropout": {"uniform": [0.0, 1.5]},
                        "schedule.kind": {"choice": ["cosine", "linear"]},
                    }
                }
            },
        )
    assert fields(info.value) == {"search.space.optim.nope", "search.space.model.dropout", "search.space.schedule.kind"}


def test_parse_override():
    assert parse_override("optim.lr=0.1") == ("optim.lr", 0.1)
    assert parse_override("model.widths=[8,8]") == ("model.widths", [8, 8])
    assert parse_override("data.train=/x/y.parquet") == ("data.train", "/x/y.parquet")
    with pytest.raises(ValueError, match="path=value"):
        parse_override("optim.lr")


def test_spec_module_imports_only_pydantic():
    import ast
    import pathlib

    import trainer.spec

    tree = ast.parse(pathlib.Path(trainer.spec.__file__).read_text())
    roots = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    import sys

    assert roots - set(sys.stdlib_module_names) <= {"pydantic", "pydantic_core"}, roots
    json.dumps(JobSpec().model_dump(mode="json"))


def test_section_valued_overrides_merge_into_the_preset():
    # natural YAML (`optim: {lr: 0.1}`) changes one field and keeps the preset's others, like `optim.lr`
    nested = resolve("debug", {"optim": {"lr": 0.1}, "data": {"train": "/d/train.parquet"}})
    dotted = resolve("debug", {"optim.lr": 0.1, "data.train": "/d/train.parquet"})
    assert nested == dotted
    assert (nested.optim.lr, nested.optim.epochs, nested.optim.batch_size) == (0.1, 2, 64)
    assert nested.data.max_train_images == PRESETS["debug"]["data"]["max_train_images"]
    # a dict-valued field is a value, not a section: it is replaced
    spec = resolve("debug", {"scaling": {"resources_per_worker": {"slot": 1}}})
    assert spec.scaling.resources_per_worker == {"slot": 1.0} and spec.scaling.num_workers == 2
    # a section the preset does not set is set as given; a misspelt field inside is still an error
    assert resolve("debug", {"checkpoint": {"keep_best": 3}}).checkpoint.max_restarts == 2
    with pytest.raises(ValidationError) as exc:
        resolve("debug", {"optim": {"learning_rate": 0.1}})
    assert fields(exc.value) == {"optim.learning_rate"}


def test_presets_say_which_recipe_they_are():
    paper, notebook, fast = resolve("paper"), resolve("notebook"), resolve("fast")
    for spec in (paper, notebook, fast):
        assert spec.model == JobSpec().model  # the paper's network, exactly
    assert (paper.optim.batch_size, paper.optim.weight_decay, paper.data.val_fraction) == (512, 1e-3, 0.0)
    assert paper.optim.weight_decay_milestones == {} and paper.data.test_every_epochs == 1
    assert not paper.data.augment.autoaugment and not paper.data.augment.random_erasing
    assert (notebook.optim.batch_size, notebook.schedule.step_per, notebook.data.val_fraction) == (256, "epoch", 0.0)
    assert notebook.optim.weight_decay_milestones == {85: 1e-4} and notebook.schedule.restart_epochs == [85]
    assert notebook.data.augment.autoaugment and notebook.data.augment.random_erasing
    assert notebook.data.augment.erasing_scale == (0.02, 0.33) and notebook.data.augment.erasing_ratio == (0.3, 3.3)
    assert fast.data.val_fraction > 0 and fast.schedule.kind == "onecycle" and fast.optim.epochs == 5
    # JSON keys of the milestones are strings: the worker's re-validation must give the same spec back
    assert JobSpec.model_validate_json(notebook.to_json()) == notebook


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"optim.weight_decay_milestones": {"50": 1e-4}}, "optim.weight_decay_milestones"),  # after epoch 2
        ({"optim.weight_decay_milestones": {"0": 1e-4}}, "optim.weight_decay_milestones"),
        ({"schedule.restart_epochs": [1]}, "schedule.restart_epochs"),
        ({"schedule.step_per": "step"}, "schedule.step_per"),
        ({"data.test_every_epochs": -1}, "data.test_every_epochs"),
        ({"data.augment.erasing_scale": [0.5, 0.2]}, "data.augment"),
        ({"data.augment.autoaugmnet": True}, "data.augment.autoaugmnet"),
    ],
)
def test_new_recipe_fields_name_their_errors(overrides, field):
    with pytest.raises(ValidationError) as info:
        resolve("debug", overrides)
    assert any(f.startswith(field) for f in fields(info.value)), error_list(info.value)


@pytest.mark.parametrize(
    "path,message",
    [
        ("no.such.field", "unknown field 'no'"),
        ("optim.lrr", "did you mean 'optim.lr'?"),
        ("model.widht", "did you mean 'model.width"),
    ],
)
def test_unknown_override_path_is_named_whole_with_a_suggestion(path: str, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        resolve("debug", {path: 1})
    [err] = error_list(exc.value)
    assert err["field"] == path and message in err["message"]


def test_free_form_mappings_take_any_key() -> None:
    spec = resolve("debug", {"scaling.resources_per_worker.accelerator_type_a100": 1})
    assert spec.scaling.resources_per_worker == {"accelerator_type_a100": 1}


# --- issue 21, items 1-2: bounded validation, bounded models ---------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model.blocks": [1, 1, 1, 10**12]}, "model.blocks.3"),  # the parameter count used to loop for days
        ({"model.widths": [1, 1, 1, 1], "model.blocks": [1, 1, 1, 2_000_000]}, "model.blocks.3"),  # 44 M params
        ({"model.widths": [1, 1, 1, 1], "model.blocks": [64, 64, 64, 64]}, "model.blocks"),  # 256 blocks deep
        ({"model.widths": [10**12, 16, 32, 32]}, "model.widths.0"),
        ({"model.widths": [8] * 9, "model.blocks": [1] * 9}, "model.widths"),  # 9 stages
        ({"model.se_reduction": 10**30, "model.se": False}, "model.se_reduction"),
        ({"optim.epochs": 10**18}, "optim.epochs"),
        ({"optim.weight_decay_milestones": {str(10**15): 1e-4}}, "optim.weight_decay_milestones"),
        ({"optim.weight_decay_milestones": {str(i): 1e-4 for i in range(1, 200)}}, "optim.weight_decay_milestones"),
        ({"schedule.t_mult": 10**9}, "schedule.t_mult"),
        ({"schedule.t0": 10**9}, "schedule.t0"),
        ({"schedule.restart_epochs": [10**12]}, "schedule.restart_epochs.0"),
        ({"checkpoint.every_epochs": 10**12}, "checkpoint.every_epochs"),
        ({"data.max_train_images": 10**40}, "data.max_train_images"),
        ({"data.train": "/x" * 5000}, "data.train"),
        ({"exports": ["pt2"] * 1000}, "exports"),
        ({"scaling.resources_per_worker": {f"r{i}": 1 for i in range(100)}}, "scaling.resources_per_worker"),
        ({"scaling.resources_per_worker": {"slot": 1e300}}, "scaling.resources_per_worker"),
        (
            {"search": {"space": {"optim.lr": {"choice": [[0.1] * 1000] * 1000}}, "num_samples": 1}},
            "search.space.optim.lr.Choice.choice.0",
        ),  # a search varies single values, never nested structures
        (
            {"search": {"space": {f"p{i}": {"grid": [1, 2]} for i in range(100)}, "num_samples": 1}},
            "search.space",
        ),
        (
            {"search": {"space": {"optim.lr": {"choice": [0.1]}}, "max_concurrent_trials": 10**9}},
            "search.max_concurrent_trials",
        ),
        ({"search": {"space": {"optim.lr": {"choice": [0.1]}}, "seed": -1}}, "search.seed"),
        (
            {
                "search": {
                    "space": {"optim.lr": {"choice": [0.1]}},
                    "scheduler": {"kind": "asha", "grace_period": 10**9},
                }
            },
            "search.scheduler.asha.grace_period",
        ),
    ],
)
def test_every_number_and_list_is_bounded_before_any_work(overrides, field):
    started = time.perf_counter()
    with pytest.raises(ValidationError) as info:
        resolve("debug", overrides)
    assert time.perf_counter() - started < 0.5  # milliseconds in fact; generous for a loaded machine
    assert any(f.startswith(field) for f in fields(info.value)), error_list(info.value)


def test_model_limits_keep_the_papers_models_and_refuse_deep_ones():
    assert sum(resolve("paper").model.blocks) == 8
    # as deep as allowed: accepted, and priced arithmetically
    spec = resolve("debug", {"model.blocks": [32, 32, 32, 32]})
    assert model_cost(spec.model)[0] > 0 and sum(spec.model.blocks) == MAX_BLOCKS
    with pytest.raises(ValidationError) as info:
        resolve("debug", {"model.blocks": [32, 32, 32, 33]})
    assert fields(info.value) == {"model.blocks"} and "too deep" in str(info.value)


def test_the_model_cost_is_closed_form():
    """The cost of the deepest stage allowed equals the cost of n blocks counted one by one (the old loop),
    and takes no longer for 64 blocks than for 1: no work per block."""
    one = ModelSpec(widths=[8, 16], blocks=[1, 1], se_reduction=4)
    many = ModelSpec(widths=[8, 16], blocks=[1, MAX_BLOCKS_PER_STAGE], se_reduction=4)
    extra_block = model_cost(ModelSpec(widths=[8, 16], blocks=[1, 2], se_reduction=4))[0] - model_cost(one)[0]
    assert model_cost(many)[0] == model_cost(one)[0] + (MAX_BLOCKS_PER_STAGE - 1) * extra_block
    # and a constructed-in-memory spec that skips validation (model_construct) is still priced instantly
    huge = ModelSpec.model_construct(widths=[8, 16], blocks=[1, 10**12], se=True, se_reduction=4, num_classes=10)
    started = time.perf_counter()
    params, _ = model_cost(huge)
    assert time.perf_counter() - started < 0.05 and params > 10**12


def test_error_messages_quote_at_most_a_short_prefix_of_a_bad_value():
    cases = [
        {"scaling.num_workers": "x" * 100_000},
        {"scaling.num_workers": [["y" * 1000] * 1000] * 1000},
        {"x" * 100_000: 1},  # an unknown override path
        {"scaling.resources_per_worker": {"node:" + "z" * 150: 1}},
    ]
    for overrides in cases:
        with pytest.raises(ValidationError) as info:
            resolve("debug", overrides)
        for err in error_list(info.value):
            assert len(err["message"]) <= 1000 and len(err["field"]) <= 200, err
            assert "x" * 300 not in err["message"] and "y" * 300 not in err["message"]
    assert len(short("q" * 10**6)) <= 200 and len(short([[list(range(1000))] * 1000] * 1000)) <= 200
