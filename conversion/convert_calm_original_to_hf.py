"""Convert a CALM checkpoint released by the authors (cccczshao/CALM-M, -L, -XL) into this package's format.

CPU example (the parity fixture that ships with the tests):

    python conversion/convert_calm_original_to_hf.py --calm tests/fixtures/reference_tiny/calm \
        --autoencoder tests/fixtures/reference_tiny/ae --output runs/calm-tiny-converted

Real checkpoint (see conversion/README.md for the downloads):

    python conversion/convert_calm_original_to_hf.py --calm ckpt/CALM-M --autoencoder ckpt/CALM-Autoencoder \
        --tokenizer ckpt/llama3-tokenizer --output runs/CALM-M-hf --source_repo cccczshao/CALM-M \
        --autoencoder_repo cccczshao/CALM-Autoencoder

The output folder loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`; the run ends by
doing exactly that and checking that the reloaded model reproduces the converted one. Every input path is checked
before any work; the folder is written next to --output under a temporary name and moved into place only after
every check passed, so a failure leaves nothing behind; a non-empty --output is replaced only with --overwrite, and
never when it is (or holds) an input.
"""

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from conversion.calm_conversion import convert_calm  # noqa: E402
from conversion.converted_folder import check_paths, push_folder_to_hub, write_verified  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calm", required=True, help="the authors' CALM folder (config.json + weights)")
    parser.add_argument("--autoencoder", required=True,
                        help="the authors' autoencoder folder (config.json, and weights if the CALM lacks a copy)")
    parser.add_argument("--output", required=True, help="folder to write the converted model to")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output folder (only once the new folder passed every check)")
    parser.add_argument("--tokenizer", help="local tokenizer folder (Llama-3); [PAD] is added if missing")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--license", default="mit", help="license field of the model card (check the source's!)")
    parser.add_argument("--source_repo", help="Hub id of the source CALM, for the model card (e.g. cccczshao/CALM-M)")
    parser.add_argument("--autoencoder_repo", help="Hub id of the source autoencoder, for the model card")
    parser.add_argument("--allow_autoencoder_mismatch", action="store_true",
                        help="convert even if --autoencoder's weights differ from the CALM's own copy (used)")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the verified folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    args = parser.parse_args(argv)
    try:
        inputs = {"--calm": args.calm, "--autoencoder": args.autoencoder, "--tokenizer": args.tokenizer}
        check_paths(inputs, args.output, args.overwrite)
    except ValueError as error:
        parser.error(str(error))

    model, report = convert_calm(args.calm, args.autoencoder, args.dtype, args.allow_autoencoder_mismatch)
    write_verified(
        model, args.output, report, overwrite=args.overwrite, tokenizer_dir=args.tokenizer, license=args.license,
        source_repo=args.source_repo, autoencoder_repo=args.autoencoder_repo, repo_id=args.push_to_hub,
    )
    print(report.format())
    print(f"saved to {args.output}")
    if args.push_to_hub:
        print(f"pushed: {push_folder_to_hub(args.output, args.push_to_hub, private=args.private)}")


if __name__ == "__main__":
    main()
