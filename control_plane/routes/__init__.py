"""Route handlers: thin — decode, ask the catalog, encode."""
