"""Image origins. ``create_upstream("KIND:TARGET", settings)`` builds one."""
