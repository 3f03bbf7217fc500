"""r2f_ray."""
