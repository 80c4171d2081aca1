"""Image generation: `<lora:…>` prompt tags, LoRA files, diffusers pipelines, samplers, infotext, grids.

The modules (nothing is imported here, so `lora-scripts --help` does not load diffusers):

    prompt_tags   parse_prompt(text) -> ParsedPrompt(text without tags, loras=(LoraTag, …))
    lora_library  LoraLibrary.scan(folders).resolve(name) -> LoraFile (path, metadata, short_hash())
    lora_apply    load_lora(pipe, path, adapter) -> LoadedLora; set_lora_weights(pipe, loras, [(te, unet)])
    weight_patch  LoHa / LoKr / DoRA files patched into the layers' weights (W + w·ΔW), originals kept
    samplers      resolve_sampler("Euler a") -> SamplerSpec; make_scheduler(spec, config, prediction_type)
    pipeline      load_pipeline(...) -> LoadedPipeline (SD or SDXL); render_image(pipe, text, settings, seed)
    infotext      build_infotext(...), parse_infotext(text)
    outputs       save_png(path, image, infotext), image_paths(...), read_png_infotext(path)
    grid          make_grid(rows, labels)
    generate      run_generate(GenerateOptions) -> GenerateResult: the `generate` command
    cli_args      the command's argparse arguments

Sampling during training uses the same pieces, with the pipeline of the family being trained:

    parsed = parse_prompt("a temple, <lora:ink:0.7>")
    pipe = family.sampling_pipeline(scheduler, accelerator.unwrap_model).pipe
    settings = SamplingSettings(sampler=resolve_sampler("euler_a"), steps=20, width=512, height=512)
    image = render_image(pipe, parsed.text, settings, seed=42)
    save_png(path, image, build_infotext(prompt=..., sampler=settings.sampler.display_name, seed=42, ...))
"""
