"""A user's own package, as a platform team would have one: the networks (`nets`) that dscguard's bundles name by
import path (`dscguard_examples.nets:digits_cnn`), and `prepare`, which trains them briefly and writes the pieces
`dscguard bundle create` takes."""
