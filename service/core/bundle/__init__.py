"""Model bundles: the user's own model, weights and trusted data, in one directory the defense can take.

A bundle is a directory:

    bundle.json            the manifest (`BundleManifest`): architecture, input spec, files, stream and defense
                           settings; validated, schema-versioned
    bundle.schema.json     its JSON Schema, written beside it by `create_bundle`
    online.safetensors     the current weights (required)
    auxiliary.safetensors  an earlier checkpoint of the same architecture (optional)
    trusted.safetensors    the trusted clean set: x [N, *input.shape] and y [N] (required)
    optimizer.safetensors  the stream optimizer's state to start from: momentum_buffer.<parameter name> (optional)

No pickle anywhere: tensors are read with `safetensors.torch.load_file`, and a pickle file where safetensors is
expected is refused before it is opened. Every problem is a `BundleError`: one line naming the file and the field.

- `create_bundle(out_dir, manifest, online, trusted, auxiliary=None, optimizer_state=None)`: from the user's
  pieces;
- `create_bundle_from_profile(config, out_dir)`: from a profile's burn-in;
- `load_bundle(path) -> LoadedBundle`: the manifest, the online model, the auxiliary (or None), the trusted set,
  the optimizer state (or None);
- `check_bundle(path) -> CheckReport`: load, predict the trusted set, calibrate guard's update gate.

Serving one (`serving`): `bundle_config` (the bundle's stream, strategy and calibration settings in an experiment's
configuration), `bundle_experiment` (an `Experiment` whose burn-in is the bundle and whose learners' optimizer starts
from its optimizer state, for the worker and for `eval`/`attack --bundle --data`), `bundle_fingerprint` (what a
checkpoint of a served bundle records); `architecture.bundle_model_spec` and `build_model_from_spec` (the model spec
a learner, its checkpoints and the published model rebuild it from).

The modules: `manifest` (the format), `architecture` (building the model it names), `store` (reading, checking and
writing the files), `profile` (a profile's burn-in as a bundle), `check` (the check before serving), `serving` (a
bundle in place of a profile's burn-in), `experiment` (the bundle's `Experiment`, imported by `serving` when used).
"""

from service.core.bundle.check import CheckReport, check_bundle
from service.core.bundle.manifest import (
    MANIFEST_FILE,
    SCHEMA_FILE,
    SCHEMA_VERSION,
    BundleError,
    BundleManifest,
    read_manifest,
)
from service.core.bundle.profile import create_bundle_from_profile
from service.core.bundle.store import LoadedBundle, create_bundle, load_bundle, read_trusted

__all__ = [
    "MANIFEST_FILE",
    "SCHEMA_FILE",
    "SCHEMA_VERSION",
    "BundleError",
    "BundleManifest",
    "CheckReport",
    "LoadedBundle",
    "check_bundle",
    "create_bundle",
    "create_bundle_from_profile",
    "load_bundle",
    "read_manifest",
    "read_trusted",
]
