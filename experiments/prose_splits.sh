# Sourced by the experiment scripts. prose_splits DATA SPLITS: the whole-file split of DATA/english_pd_prose
# into SPLITS/{train,validation,test} as symlinks (made once; results/prose-smollm2/README.md names the files):
# validation = chesterton-thursday + 2005-GWBush, test = austen-persuasion + 2006-GWBush, train = the rest.
prose_splits() {
    local data=$1 splits=$2 prose file rel split
    [ -d "$splits/train" ] && return 0
    prose=$(realpath "$data/english_pd_prose")
    mkdir -p "$splits.tmp"/{train,validation,test}
    for file in "$prose"/*/*.txt; do
        rel=${file#"$prose"/}
        case "$rel" in
            */README.nltk.txt) continue ;;
            gutenberg/chesterton-thursday.txt | state_union/2005-GWBush.txt) split=validation ;;
            gutenberg/austen-persuasion.txt | state_union/2006-GWBush.txt) split=test ;;
            *) split=train ;;
        esac
        ln -s "$file" "$splits.tmp/$split/${rel//\//__}"
    done
    mv "$splits.tmp" "$splits"
}
