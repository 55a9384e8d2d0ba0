"""Typed configuration: pydantic models, TOML files with ``extends``, env and ``key=value`` overrides.

Precedence, lowest first: the defaults in these models -> the file chain (a file may say
``extends = "base.toml"``, relative to itself) -> environment ``MEDCTL_<SECTION>__<KEY>`` -> command
line ``key=value``. Values from the environment and the command line are parsed as TOML values, so
``train.lr_head=1e-4`` is a float and ``data.preprocess.spatial_size=[8,16,16]`` a list.

The merge rule of ``extends``: tables (sections and inline tables such as ``model.encoder_args``) merge
key by key, so a child's ``encoder_args = {}`` keeps every key of the parent's; any other value (a
string, a number, a list, an array of tables such as ``[[data.targets]]``) replaces the parent's whole.
A child replaces a table whole, or drops it back to its default, by naming it in a top-level
``replace = ["model.encoder_args"]`` list beside ``extends``. Environment and command-line values
always replace whole (``model.encoder_args={}`` empties it).

Every problem in a config is reported at once in one :class:`~medctl.errors.ConfigError`. Defaults
live here and nowhere else.

The package: :mod:`~medctl.config.models` (the sections and their defaults), :mod:`~medctl.config.loader`
(the layers, the checks, the error lines) and :mod:`~medctl.config.toml` (trees as TOML reads them). Import
from ``medctl.config``: every public name is here.
"""

from __future__ import annotations

from medctl.config.loader import (
    ADDED_KEYS as ADDED_KEYS,
)
from medctl.config.loader import (
    ENV_PREFIX as ENV_PREFIX,
)
from medctl.config.loader import (
    apply_overrides as apply_overrides,
)
from medctl.config.loader import (
    blame_layers as blame_layers,
)
from medctl.config.loader import (
    checkpoint_config as checkpoint_config,
)
from medctl.config.loader import (
    describe_validation_errors as describe_validation_errors,
)
from medctl.config.loader import (
    env_overrides as env_overrides,
)
from medctl.config.loader import (
    load_config as load_config,
)
from medctl.config.loader import (
    parse_overrides as parse_overrides,
)
from medctl.config.loader import (
    read_toml_chain as read_toml_chain,
)
from medctl.config.loader import (
    replace_problems as replace_problems,
)
from medctl.config.loader import (
    takes_tables as takes_tables,
)
from medctl.config.loader import (
    unknown_key_problems as unknown_key_problems,
)
from medctl.config.loader import (
    upgrade_saved_tree as upgrade_saved_tree,
)
from medctl.config.models import (
    MOVED_KEYS as MOVED_KEYS,
)
from medctl.config.models import (
    SWEEP_MODES as SWEEP_MODES,
)
from medctl.config.models import (
    AugmentConfig as AugmentConfig,
)
from medctl.config.models import (
    Config as Config,
)
from medctl.config.models import (
    DataConfig as DataConfig,
)
from medctl.config.models import (
    EEGConfig as EEGConfig,
)
from medctl.config.models import (
    GridConfig as GridConfig,
)
from medctl.config.models import (
    HeadConfig as HeadConfig,
)
from medctl.config.models import (
    ModelConfig as ModelConfig,
)
from medctl.config.models import (
    PreprocessConfig as PreprocessConfig,
)
from medctl.config.models import (
    PretrainConfig as PretrainConfig,
)
from medctl.config.models import (
    RunConfig as RunConfig,
)
from medctl.config.models import (
    SaliencyConfig as SaliencyConfig,
)
from medctl.config.models import (
    Section as Section,
)
from medctl.config.models import (
    SourceConfig as SourceConfig,
)
from medctl.config.models import (
    SweepConfig as SweepConfig,
)
from medctl.config.models import (
    SweepMode as SweepMode,
)
from medctl.config.models import (
    TargetConfig as TargetConfig,
)
from medctl.config.models import (
    TrackingConfig as TrackingConfig,
)
from medctl.config.models import (
    TrainConfig as TrainConfig,
)
from medctl.config.toml import (
    deep_merge as deep_merge,
)
from medctl.config.toml import (
    drop_dotted as drop_dotted,
)
from medctl.config.toml import (
    dump_toml as dump_toml,
)
from medctl.config.toml import (
    parse_value as parse_value,
)
from medctl.config.toml import (
    set_dotted as set_dotted,
)
