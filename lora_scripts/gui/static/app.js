// The page's script: small and dependency-free, one ES module per part (no build step).
import { api } from "./api.js";
import { initCheck } from "./check.js";
import { initConfig } from "./config.js";
import { initDataset } from "./dataset.js";
import { initGenerate } from "./generate.js";
import { initLibrary } from "./library.js";
import { initTrain } from "./train.js";

export { api, showErrors } from "./api.js";

async function start() {
  const language = document.body.dataset.language;
  window.strings = await api(`/api/i18n/${language}`);
  document.getElementById("language").addEventListener("change", (event) => {
    document.cookie = `lora_scripts_lang=${event.target.value}; path=/; samesite=strict`;
    location.reload();
  });
  const roots = await api("/api/roots");
  await initDataset(roots);
  await initConfig();
  initCheck();
  initTrain();
  initGenerate();
  initLibrary();
}

start();
