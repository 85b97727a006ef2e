"""The edge caching proxy: an aiohttp service over ``ImageCache`` and an upstream."""
