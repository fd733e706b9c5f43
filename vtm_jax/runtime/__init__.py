"""The one device path: a ``Mesh`` over the devices, batch shardings, jitted steps, gathers."""
