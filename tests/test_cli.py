"""The command-line plumbing: arguments derived from the config, errors as one line."""
import pytest

from hvd_sparse.cli import parse_config
from hvd_sparse.config import ConfigError
from hvd_sparse.engine import validate


def test_cli_is_derived_from_the_dataclasses():
    cfg = parse_config(
        ["--dataset", "synthetic", "--sparsity", "0.9", "--optimizer", "nesterov", "--lr", "0.05",
         "--batch-size", "128", "--no-prune-biases", "--snip-seed", "7", "--out", "x"],
        "prog", "",
    )
    assert cfg.data.dataset == "synthetic"
    assert cfg.prune.sparsity == 0.9 and cfg.prune.prune_biases is False and cfg.prune.snip_seed == 7
    assert cfg.optim.optimizer == "nesterov" and cfg.optim.lr == 0.05
    assert cfg.train.batch_size == 128 and cfg.run.out == "x"


@pytest.mark.parametrize("argv, fragment", [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.5"], "--sparsity must be in [0, 1)"),
    (["--batch-size", "3.5"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--schedule", "cosine"], "argument --schedule: invalid choice: 'cosine'"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--optimizer", "adam"], "unknown optimizer 'adam'"),
])
def test_cli_errors_are_one_line_errors(argv, fragment, capsys):
    """What train checks before any rank talks to another (``test_train`` runs one of each stage at np=2)."""
    with pytest.raises(ValueError) as exc:
        validate(parse_config(["--dataset", "synthetic", *argv], "prog", ""))
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert capsys.readouterr().err == ""  # no usage dump


def test_a_gradient_compression_renamed_in_0_2_0_names_its_new_name_on_the_command_line():
    with pytest.raises(ConfigError, match="--grad-compression mask is now called kept"):
        parse_config(["--grad-compression", "mask"], "prog", "")
    with pytest.raises(ConfigError, match="must be one of none, fp16, kept, kept-fp16"):
        parse_config(["--grad-compression", "topk"], "prog", "")


def test_an_error_quoting_a_huge_value_is_cut_to_one_readable_line(capsys):
    from hvd_sparse.cli import error_line

    error_line(ValueError(f"--noise-scale-every must be an integer, got {[1] * 20000!r}"), "hvd_sparse.study")
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and len(line) < 2100 and line.rstrip().endswith(" more characters)")
