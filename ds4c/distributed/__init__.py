"""Running one program over several devices: the mesh a program is sharded for
(``ds4c.distributed.mesh``) and the process groups its ranks run on (``ds4c.distributed.runtime``)."""

from ds4c.distributed.mesh import Mesh

__all__ = ["Mesh"]
