import { defineConfig } from "vite";

// Served by `python -m server serve --http-port P` at http://host:P/console/.
export default defineConfig({
  base: "/console/",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
  },
});
