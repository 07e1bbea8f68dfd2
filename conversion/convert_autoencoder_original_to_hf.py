"""Convert the CALM authors' autoencoder (cccczshao/CALM-Autoencoder) into a `CalmAutoencoder` folder.

CPU example (the parity fixture that ships with the tests):

    python conversion/convert_autoencoder_original_to_hf.py --autoencoder tests/fixtures/reference_tiny/ae \
        --output runs/calm-ae-tiny-converted

Real checkpoint (see conversion/README.md for the downloads):

    python conversion/convert_autoencoder_original_to_hf.py --autoencoder ckpt/CALM-Autoencoder \
        --tokenizer ckpt/llama3-tokenizer --output runs/CALM-Autoencoder-hf --source_repo cccczshao/CALM-Autoencoder

The output folder loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`; the run ends by doing
exactly that and checking that the reloaded autoencoder reproduces the converted one. Paths, --overwrite and
failures are handled as in convert_calm_original_to_hf.py: nothing is written until every check passed.
"""

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from conversion.calm_conversion import convert_autoencoder  # noqa: E402
from conversion.converted_folder import check_paths, push_folder_to_hub, write_verified  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autoencoder", required=True, help="the authors' autoencoder folder (config.json + weights)")
    parser.add_argument("--output", required=True, help="folder to write the converted autoencoder to")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output folder (only once the new folder passed every check)")
    parser.add_argument("--tokenizer", help="local tokenizer folder (Llama-3); [PAD] is added if missing")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--license", default="mit", help="license field of the model card (check the source's!)")
    parser.add_argument("--source_repo", help="Hub id of the source, for the model card (cccczshao/CALM-Autoencoder)")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the verified folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    args = parser.parse_args(argv)
    try:
        check_paths({"--autoencoder": args.autoencoder, "--tokenizer": args.tokenizer}, args.output, args.overwrite)
    except ValueError as error:
        parser.error(str(error))

    model, report = convert_autoencoder(args.autoencoder, args.dtype)
    write_verified(
        model, args.output, report, overwrite=args.overwrite, tokenizer_dir=args.tokenizer, license=args.license, source_repo=args.source_repo,
        script="conversion/convert_autoencoder_original_to_hf.py", repo_id=args.push_to_hub,
    )
    print(report.format())
    print(f"saved to {args.output}")
    if args.push_to_hub:
        print(f"pushed: {push_folder_to_hub(args.output, args.push_to_hub, private=args.private)}")


if __name__ == "__main__":
    main()
