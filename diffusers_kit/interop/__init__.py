"""Models of other libraries used as dkit components.

:mod:`diffusers_kit.interop.diffusers_folder` reads local diffusers folders (a pipeline saved
with ``save_pretrained`` or one of its component folders): the network
:class:`~diffusers_kit.networks.diffusers_unet.DiffusersUNet` and the process
:class:`~diffusers_kit.processes.diffusers_scheduler.DiffusersSchedule` (DDPM-family schedulers)
or :class:`~diffusers_kit.processes.diffusers_flow.DiffusersFlow` (flow-matching ones) are
built on it (``docs/diffusers.md``). :mod:`diffusers_kit.interop.unet2d` maps dkit's own U-Net
onto a diffusers ``UNet2DModel`` for ``dkit export``.
"""
