"""What a run shows of itself: Lightning's rich model summary and progress bar, less two things they get wrong
for varctl's runs. The summary's FLOPs column and total are counted on a module's ``example_input_array``,
which no stage has (a batch is a dict of images, labels, captions and control maps), so every run printed
"FLOPs 0" and "Total FLOPs: 0"; the column and the total are left out where nothing was counted. The
progress bar named a run bounded by steps (``max_epochs: -1``) "Epoch 0/-2"; it says "Epoch 0"."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)

RIGHT = {"Params", "Params per Device", "FLOPs", "In sizes", "Out sizes"}  # columns of numbers


class ModelSummary(RichModelSummary):
    """Lightning's rich summary; FLOPs only where they were counted (see the module docstring)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if total_flops or name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for i, (name, _) in enumerate(columns):
            justify = "right" if name in RIGHT else "left"
            table.add_column(name, justify=justify, style="dim" if i == 0 else None)
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        totals = {
            "Trainable params": get_human_readable_count(int(trainable_parameters)),
            "Non-trainable params": get_human_readable_count(int(total_parameters - trainable_parameters)),
            "Total params": get_human_readable_count(int(total_parameters)),
            "Total estimated model params size (MB)": get_formatted_model_size(model_size),
            "Modules in train mode": total_training_modes["train"],
            "Modules in eval mode": total_training_modes["eval"],
        }
        if total_flops:
            totals["Total FLOPs"] = get_human_readable_count(int(total_flops))
        for label, value in totals.items():
            console.print(f"[bold]{label}[/]: {value}")


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar; an epoch of a run without an epoch limit is "Epoch N", not "N/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"  # padded as Lightning's
