"""NePhi: neural deformation fields (METHODS.md methods 2 and 3).

Modules: :mod:`.trilinear` (twice-differentiable latent-grid sampling), :mod:`.field` (Fourier features,
modulated SIREN, forward/backward maps sharing a latent code), :mod:`.encoder` (image pair -> latent codes),
:mod:`.losses` (NCC on sampled points, GradICON, latent prior), :mod:`.objective` (the training/IO loss of one
pair), :mod:`.model_io` (model files), :mod:`.synthetic` (random smooth warps for training), :mod:`.train`,
:mod:`.cli`. Coordinates inside the field are the working grid's normalised coordinates
(:mod:`nephireg.geometry`); conversions to millimetres happen only through :mod:`nephireg.sampling`.
"""
