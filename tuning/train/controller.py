"""fms-hf-tuning's trainer controller (``--trainer_controller_config_file``): rules on metrics, evaluated on
Trainer events, that stop training, save a checkpoint or log. The file format is fms-hf-tuning's, so its
rule files run unchanged:

    controller_metrics:            # name → class (+ arguments): what a rule can read
      - name: training_loss
        class: Loss
    operations:                    # optional; hfcontrols (HFControls) is always there
      - name: logger
        class: LogControl
        arguments: {log_format: "step {trainer_state[global_step]}", log_level: info}
    controllers:
      - name: stop_on_low_loss
        triggers: [on_log]         # Trainer events that evaluate the rule
        rule: training_loss["loss"] < 1.0
        patience: {patience_threshold: 2}   # act only after the rule held this many more times
        config: {trigger_log_level: warning}
        operations: [hfcontrols.should_training_stop]

Rules are evaluated by simpleeval (fms-hf-tuning's choice; never ``eval``). Everything a rule can get wrong
before training (an unknown metric, class, event or operation, a syntax error) is a UserError at start
naming the rule. While training, a rule reading a metric not computed yet (``None``, a missing key, an
empty window) is skipped for that event, as fms-hf-tuning skips unavailable metrics.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
from collections import deque
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuning.errors import UserError
from tuning.files import read_mapping_file

logger = logging.getLogger(__name__)

# every Trainer event a rule may trigger on (TrainerCallback's own hooks)
EVENTS = tuple(name for name in dir(TrainerCallback) if name.startswith("on_"))
HF_ACTIONS = tuple(f.name for f in dataclasses.fields(TrainerControl) if f.name.startswith("should_"))
FUNCTIONS = {
    "abs": abs,
    "len": len,
    "round": round,
    "sum": sum,
    "min": min,
    "max": max,
    "math_trunc": math.trunc,
    "math_floor": math.floor,
    "math_ceil": math.ceil,
    "math_sqrt": math.sqrt,
}
_MISSING = (KeyError, IndexError)  # a window or log that has no such value yet


class _Unavailable:
    """A metric with no value yet: only ``== None`` / ``!= None`` may be asked of it (fms-hf-tuning's rule)."""

    def __eq__(self, other: object) -> bool:
        if other is None:
            return True
        raise _NotYet

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __getattr__(self, name: str) -> Any:
        raise _NotYet

    def _unavailable(self, *args: Any) -> Any:
        raise _NotYet

    __lt__ = __le__ = __gt__ = __ge__ = __getitem__ = __add__ = __sub__ = __mul__ = _unavailable
    __truediv__ = __floordiv__ = __mod__ = __and__ = __or__ = __neg__ = __float__ = __int__ = _unavailable
    __hash__ = None  # type: ignore[assignment]


class _NotYet(Exception):
    pass


# ---- metrics: name → what a rule reads, and the events that recompute it (fms-hf-tuning's classes) ----


def _last_loss_log(state: TrainerState) -> dict | None:
    return next((log for log in reversed(state.log_history) if "loss" in log), None)


class Metric:
    events: tuple[str, ...] = EVENTS

    def __init__(self, **arguments: Any) -> None:
        if arguments:
            raise TypeError(f"takes no arguments, got {sorted(arguments)}")

    def compute(self, state: TrainerState, event: str, **kwargs: Any) -> Any:
        raise NotImplementedError


class Loss(Metric):
    """The last training log record with a loss (a dict: ``training_loss["loss"]``)."""

    events = ("on_log",)

    def compute(self, state: TrainerState, event: str, **kwargs: Any) -> Any:
        return _last_loss_log(state)


class TrainingState(Metric):
    """The TrainerState as a dict, plus ``is_final`` on the last save."""

    def compute(self, state: TrainerState, event: str, **kwargs: Any) -> Any:
        out = dataclasses.asdict(state)
        out["is_final"] = bool(
            kwargs.get("is_final", state.max_steps and state.global_step >= state.max_steps)
        )
        return out


class EvalMetrics(Metric):
    """The evaluation's metrics (``evalmetric["eval_loss"]``)."""

    def __init__(self, source_event: str = "on_evaluate", **arguments: Any) -> None:
        super().__init__(**arguments)
        if source_event not in ("on_evaluate", "on_predict"):
            raise TypeError(f"source_event must be on_evaluate or on_predict, not {source_event}")
        self.events = (source_event,)

    def compute(self, state: TrainerState, event: str, **kwargs: Any) -> Any:
        return kwargs.get("metrics")


class PerProcessState(Metric):
    """``{"rank": N}``."""

    def compute(self, state: TrainerState, event: str, **kwargs: Any) -> Any:
        import torch.distributed as dist  # noqa: PLC0415 - only this metric asks

        return {"rank": dist.get_rank() if dist.is_available() and dist.is_initialized() else 0}


class HistoryBasedMetric(Metric):
    """A sliding window of the last ``window_size`` training losses and evaluations:
    ``{"training_loss": {"loss": [...], "steps": [...], "epoch": [...]}, "metrics": {"eval_loss": [...],
    ...}, "window_size": N}`` (fms-hf-tuning's layout; a negative size keeps everything)."""

    events = ("on_log", "on_evaluate")

    def __init__(self, window_size: int = 1, **arguments: Any) -> None:
        super().__init__(**arguments)
        self.window: dict[str, Any] = {"training_loss": {}, "metrics": {}, "window_size": int(window_size)}

    def _add(self, kind: str, values: dict[str, Any]) -> None:
        columns = self.window[kind]
        if not columns:
            columns.update({key: deque() for key in values})
        for key in columns:
            columns[key].append(values.get(key))
            if 0 <= self.window["window_size"] < len(columns[key]):
                columns[key].popleft()

    def compute(self, state: TrainerState, event: str, **kwargs: Any) -> Any:
        if kwargs.get("metrics") is not None:
            self._add("metrics", {**kwargs["metrics"], "steps": state.global_step, "epoch": state.epoch})
        else:
            log = _last_loss_log(state)
            if log is not None:
                entry = {"loss": float(log["loss"]), "steps": state.global_step, "epoch": float(log["epoch"])}
                losses = self.window["training_loss"]
                # the same record seen again (a later on_log without a loss) is not a new value
                if not losses or losses["loss"][-1] != entry["loss"] or losses["epoch"][-1] != entry["epoch"]:
                    self._add("training_loss", entry)
        return self.window


METRIC_CLASSES: dict[str, type[Metric]] = {
    cls.__name__: cls for cls in (Loss, TrainingState, EvalMetrics, PerProcessState, HistoryBasedMetric)
}


# ---- operations ----


class HFControls:
    """Sets the TrainerControl switch of the same name (``should_training_stop``, ``should_save``...)."""

    actions = HF_ACTIONS

    def __init__(self, **arguments: Any) -> None:
        if arguments:
            raise TypeError(f"takes no arguments, got {sorted(arguments)}")

    def act(self, action: str, control: TrainerControl, **kwargs: Any) -> None:
        setattr(control, action, True)


class LogControl:
    """``should_log``: logs ``log_format`` formatted with the metrics, ``event_name``, ``control_name``."""

    actions = ("should_log",)

    def __init__(self, log_format: str, log_level: str = "info", **arguments: Any) -> None:
        if arguments:
            raise TypeError(f"unknown arguments {sorted(arguments)}")
        level = logging.getLevelName(str(log_level).upper())
        if not isinstance(level, int):
            raise TypeError(f"log_level {log_level!r} is not a logging level")
        self.log_format, self.level = log_format, level

    def act(self, action: str, control: TrainerControl, **kwargs: Any) -> None:
        try:
            logger.log(self.level, self.log_format.format(**kwargs))
        except (KeyError, IndexError, AttributeError) as e:
            logger.warning(
                "controller %s: log_format names %s, which this event lacks", kwargs["control_name"], e
            )


OPERATION_CLASSES = {"HFControls": HFControls, "LogControl": LogControl}


@dataclasses.dataclass
class Patience:
    """Tolerate the rule holding ``patience_threshold`` times before acting (fms-hf-tuning's counter:
    ``reset_on_failure`` starts over when the rule fails, ``no_reset_on_failure`` keeps counting)."""

    patience_threshold: int = 1
    mode: str = "reset_on_failure"
    counter: int = 0

    def tolerate(self, held: bool) -> bool:
        if held:
            self.counter += 1
        elif self.mode == "reset_on_failure":
            self.counter = 0
        if self.counter <= self.patience_threshold:
            return True
        self.counter = 0
        return False


@dataclasses.dataclass
class Rule:
    name: str
    source: str
    tree: Any
    operations: list[tuple[Any, str]]
    level: int
    patience: Patience | None


class TrainerController(TrainerCallback):
    """The rules of one controller file as a Trainer callback."""

    def __init__(self, path: str) -> None:
        from simpleeval import EvalWithCompoundTypes  # noqa: PLC0415 - an extra: only this feature needs it

        self._evaluator_class = EvalWithCompoundTypes
        spec = read_mapping_file(path, "--trainer_controller_config_file")
        where = f"--trainer_controller_config_file {path}"
        self.metrics: dict[str, Metric] = {}
        for entry in spec.get("controller_metrics") or []:
            name, cls, arguments = _entry(entry, METRIC_CLASSES, "metric", where)
            try:
                self.metrics[name] = cls(**arguments)
            except TypeError as e:
                raise UserError(f"{where}: metric {name} ({entry.get('class')}): {e}") from None
        operations: dict[str, Any] = {"hfcontrols": HFControls()}
        for entry in spec.get("operations") or []:
            name, cls, arguments = _entry(entry, OPERATION_CLASSES, "operation", where)
            try:
                operations[name] = cls(**arguments)
            except TypeError as e:
                raise UserError(f"{where}: operation {name} ({entry.get('class')}): {e}") from None
        self.rules: dict[str, list[Rule]] = {}
        for entry in spec.get("controllers") or []:
            rule = self._rule(entry, operations, where)
            triggers = entry.get("triggers") or []
            if not triggers:
                raise UserError(
                    f"{where}: controller {rule.name} has no triggers; add e.g. triggers: [on_log]"
                )
            for event in triggers:
                if event not in EVENTS:
                    raise UserError(
                        f"{where}: controller {rule.name}: unknown trigger {event!r}; events: {', '.join(EVENTS)}"
                    )
                self.rules.setdefault(event, []).append(rule)
        self.values: dict[str, Any] = dict.fromkeys(self.metrics)
        for event in set(EVENTS) - {"on_init_end"}:  # every hook recomputes its metrics, then runs its rules
            setattr(self, event, self._hook(event))

    def _rule(self, entry: dict, operations: dict[str, Any], where: str) -> Rule:
        name = str(entry.get("name") or "(unnamed)")
        source = str(entry.get("rule", ""))
        if "__" in source:
            raise UserError(f"{where}: controller {name}: a rule may not use '__'")
        try:
            tree = self._evaluator_class.parse(source)
        except SyntaxError as e:
            raise UserError(f"{where}: controller {name}: rule {source!r} is not valid: {e.msg}") from None
        known = set(self.metrics) | set(FUNCTIONS) | {"True", "False", "None"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id not in known:
                raise UserError(
                    f"{where}: controller {name}: rule names {node.id!r}, which is no metric; metrics: "
                    f"{', '.join(self.metrics) or 'none (add controller_metrics)'}"
                )
        actions = []
        for op in entry.get("operations") or []:
            handler, _, action = str(op).partition(".")
            if handler not in operations or action not in operations[handler].actions:
                raise UserError(
                    f"{where}: controller {name}: unknown operation {op!r}; e.g. hfcontrols.should_training_stop, "
                    "hfcontrols.should_save, or NAME.should_log of a LogControl operation"
                )
            actions.append((operations[handler], action))
        if not actions:
            raise UserError(f"{where}: controller {name} has no operations")
        level_name = str((entry.get("config") or {}).get("trigger_log_level", "debug")).upper()
        level = logging.getLevelName(level_name)
        patience = entry.get("patience")
        try:
            patience = Patience(**patience) if patience is not None else None
        except TypeError as e:
            raise UserError(f"{where}: controller {name}: patience: {e}") from None
        return Rule(name, source, tree, actions, level if isinstance(level, int) else logging.DEBUG, patience)

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._run("on_init_end", args, state, control, **kwargs)

    def _hook(self, event: str) -> Any:
        def hook(
            args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
        ) -> None:
            self._run(event, args, state, control, **kwargs)

        return hook

    def _run(
        self, event: str, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for name, metric in self.metrics.items():
            if event in metric.events:
                self.values[name] = metric.compute(state, event, **kwargs)
        if event == "on_save":  # what fms-hf-tuning's LogControl examples print as {path}
            kwargs.setdefault("path", f"{args.output_dir}/checkpoint-{state.global_step}")
        for rule in self.rules.get(event, []):
            held = self._outcome(rule)
            if held is None:
                continue
            if rule.patience is not None and rule.patience.tolerate(held):
                continue
            if not held:
                continue
            for operation, action in rule.operations:
                logger.log(rule.level, "controller %s: %s on %s", rule.name, action, event)
                operation.act(
                    action,
                    control,
                    event_name=event,
                    control_name=rule.name,
                    args=args,
                    **{k: v for k, v in kwargs.items() if k not in self.values},
                    **self.values,
                )

    def _outcome(self, rule: Rule) -> bool | None:
        """The rule's outcome, or None when a metric it reads has no value yet."""
        names = {k: (_Unavailable() if v is None else v) for k, v in self.values.items()}
        evaluator = self._evaluator_class(
            names={"True": True, "False": False, "None": None, **names}, functions=FUNCTIONS
        )
        try:
            outcome = evaluator.eval(rule.source, previously_parsed=rule.tree)
        except (_NotYet, *_MISSING):
            return None
        except Exception as e:  # simpleeval's refusals and type errors: the rule itself is wrong
            raise UserError(f"trainer controller {rule.name}: rule {rule.source!r} failed: {e}") from None
        if not isinstance(outcome, bool):
            raise UserError(
                f"trainer controller {rule.name}: rule {rule.source!r} gave {outcome!r}, not true or false"
            )
        return outcome


def _entry(entry: Any, classes: dict[str, type], what: str, where: str) -> tuple[str, type, dict]:
    if not isinstance(entry, dict) or "name" not in entry or "class" not in entry:
        raise UserError(f"{where}: each {what} needs a name and a class, got {entry!r:.80}")
    cls = classes.get(entry["class"])
    if cls is None:
        raise UserError(
            f"{where}: {what} {entry['name']}: unknown class {entry['class']!r}; classes: {', '.join(classes)}"
        )
    return str(entry["name"]), cls, dict(entry.get("arguments") or {})


def build_controller(path: str | None) -> TrainerController | None:
    """The controller of ``--trainer_controller_config_file``, checked before anything loads."""
    if not path:
        return None
    try:
        import simpleeval  # noqa: F401, PLC0415
    except ImportError:
        raise UserError(
            "--trainer_controller_config_file needs simpleeval, which is not installed; install it with: "
            "pip install 'tuning[controller]'"
        ) from None
    return TrainerController(path)
