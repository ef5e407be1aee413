"""Scale-out on Ray Serve: the application, `cartridge serve-ray`, and the RayService entry point."""
