# tunelab: one study from the dataset to the report.
#   snakemake --cores 2 --config study=studies/tiny.yaml     # the tiny offline study
#   snakemake --profile profiles/slurm                        # config.yaml on a SLURM cluster
# Every rule calls one `tunelab <stage>` command; all logic lives in src/tunelab/<stage>.py.
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
