use super::*;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-text-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn words_are_lowercased_and_split_on_punctuation() {
    let w: Vec<String> = words("It's a GREAT film -- isn't it? 10/10").collect();
    assert_eq!(w, ["it's", "a", "great", "film", "isn't", "it", "10", "10"]);
}

#[test]
fn the_word_vocabulary_comes_from_training_text_by_frequency() {
    let v = WordVocab::build(["b a a", "c b a", "d"], 100, 2);
    // a (3), b (2); c and d are below the minimum count.
    assert_eq!(v.len(), 4);
    assert_eq!(v.encode("a b c", 5), vec![2.0, 3.0, UNK as f32, 0.0, 0.0]);
    assert_eq!(v.encode("a a a a a a", 3), vec![2.0; 3], "truncated");
    let capped = WordVocab::build(["b a a", "c b a"], 3, 1);
    assert_eq!(capped.len(), 3, "PAD, UNK and the top word");
    assert_eq!(capped.encode("b", 1), vec![UNK as f32]);
}

#[test]
fn sst2_and_ag_news_load_and_bad_lines_name_their_line() {
    let dir = temp_dir("tsv");
    std::fs::create_dir_all(dir.join(SST2_DIR)).unwrap();
    std::fs::write(
        dir.join(SST2_DIR).join("train.tsv"),
        "sentence\tlabel\ngood good film \t1\nbad bad film \t0\n",
    )
    .unwrap();
    std::fs::write(
        dir.join(SST2_DIR).join("dev.tsv"),
        "sentence\tlabel\ngood film\t1\n",
    )
    .unwrap();
    let split = load_sst2(&dir).unwrap();
    assert_eq!(split.train.len(), 2);
    assert_eq!(split.train.example_shape, vec![DEFAULT_SEQ_LEN]);
    assert_eq!(split.train.labels, vec![1, 0]);
    assert_eq!(split.test.vocab_size, split.train.vocab_size);
    // "good", "bad" and "film" twice each: all in the vocabulary.
    assert_eq!(split.train.vocab_size, 5);
    std::fs::write(
        dir.join(SST2_DIR).join("dev.tsv"),
        "sentence\tlabel\nfine\t1\nno label here\n",
    )
    .unwrap();
    let err = load_sst2(&dir).unwrap_err().to_string();
    assert!(
        err.contains("dev.tsv:3:") && err.contains("2 tab-separated"),
        "{err}"
    );
    std::fs::write(
        dir.join(SST2_DIR).join("dev.tsv"),
        "sentence\tlabel\nfine\t7\n",
    )
    .unwrap();
    let err = load_sst2(&dir).unwrap_err().to_string();
    assert!(
        err.contains("dev.tsv:2:") && err.contains("unknown label"),
        "{err}"
    );

    std::fs::create_dir_all(dir.join(AG_NEWS_DIR)).unwrap();
    std::fs::write(
        dir.join(AG_NEWS_DIR).join("dev.tsv"),
        "stocks fell\tBusiness\nteam won\tSports\n",
    )
    .unwrap();
    std::fs::write(
        dir.join(AG_NEWS_DIR).join("test.tsv"),
        "team lost\tSports\n",
    )
    .unwrap();
    let split = load_ag_news(&dir).unwrap();
    assert_eq!(split.train.labels, vec![2, 1]);
    assert_eq!(split.train.num_classes, 4);
    std::fs::write(
        dir.join(AG_NEWS_DIR).join("test.tsv"),
        "team lost\tFootball\n",
    )
    .unwrap();
    assert!(
        load_ag_news(&dir)
            .unwrap_err()
            .to_string()
            .contains("test.tsv:1:")
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let err = load_sst2(&dir).unwrap_err().to_string();
    assert!(err.contains("sst2/train.tsv"), "{err}");
}

#[test]
fn shakespeare_windows_predict_the_next_character() {
    let dir = temp_dir("tiny");
    std::fs::create_dir_all(dir.join(TINY_SHAKESPEARE_DIR)).unwrap();
    let text: String = "To be, or not to be, that is the question.\n".repeat(40);
    std::fs::write(dir.join(TINY_SHAKESPEARE_DIR).join("input.txt"), &text).unwrap();
    let split = load_tiny_shakespeare(&dir).unwrap();
    let train = &split.train;
    assert_eq!(train.example_shape, vec![SHAKESPEARE_SEQ_LEN]);
    assert_eq!(train.num_classes, train.vocab_size);
    // Example k starts at k * stride; its label is the character after it.
    let vocab = CharVocab::build([&text[..(text.len() * 9 / 10)]]);
    let chars: Vec<char> = text.chars().collect();
    let k = 3;
    let start = k * TINY_SHAKESPEARE_STRIDE;
    let want: Vec<f32> = chars[start..start + SHAKESPEARE_SEQ_LEN]
        .iter()
        .map(|&c| vocab.id(c) as f32)
        .collect();
    assert_eq!(train.example(k), want.as_slice());
    assert_eq!(
        train.labels[k],
        vocab.id(chars[start + SHAKESPEARE_SEQ_LEN])
    );
    assert!(!split.test.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn leaf_shakespeare_gives_each_role_its_own_owner() {
    let dir = temp_dir("leaf");
    let root = dir.join(LEAF_SHAKESPEARE_DIR);
    std::fs::create_dir_all(&root).unwrap();
    let x = |c: char| c.to_string().repeat(SHAKESPEARE_SEQ_LEN);
    let train = serde_json::json!({
        "users": ["ROMEO", "JULIET"],
        "num_samples": [2, 1],
        "user_data": {
            "ROMEO": {"x": [x('a'), x('b')], "y": ["b", "c"]},
            "JULIET": {"x": [x('c')], "y": ["a"]}
        }
    });
    let test = serde_json::json!({
        "users": ["ROMEO"], "num_samples": [1],
        "user_data": {"ROMEO": {"x": [x('z')], "y": ["a"]}}
    });
    std::fs::write(root.join("all_data_x_train_9.json"), train.to_string()).unwrap();
    std::fs::write(root.join("all_data_x_test_9.json"), test.to_string()).unwrap();
    let split = load_leaf_shakespeare(&dir).unwrap();
    // Roles sorted: JULIET 0, ROMEO 1.
    assert_eq!(split.train.owners, vec![0, 1, 1]);
    assert_eq!(split.train.vocab_size, 5, "PAD, UNK, a, b, c");
    assert_eq!(
        split.test.example(0)[0],
        UNK as f32,
        "z is not in training text"
    );
    let bad = serde_json::json!({
        "users": ["ROMEO"], "num_samples": [1],
        "user_data": {"ROMEO": {"x": [x('a')], "y": ["ab"]}}
    });
    std::fs::write(root.join("all_data_x_test_9.json"), bad.to_string()).unwrap();
    let err = load_leaf_shakespeare(&dir).unwrap_err().to_string();
    assert!(err.contains("one character"), "{err}");
    std::fs::write(root.join("all_data_x_test_9.json"), "{\"users\": [\n oops").unwrap();
    let err = load_leaf_shakespeare(&dir).unwrap_err().to_string();
    assert!(err.contains("test_9.json:2:"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shakespeare_roles_give_each_role_with_enough_text_its_own_owner() {
    let dir = temp_dir("roles");
    let root = dir.join(LEAF_SHAKESPEARE_DIR);
    std::fs::create_dir_all(&root).unwrap();
    let min = SHAKESPEARE_SEQ_LEN + SHAKESPEARE_ROLES_STRIDE * SHAKESPEARE_ROLES_MIN_WINDOWS;
    // Long enough that 90% of it still makes the minimum.
    let long = |c: &str| c.repeat(min * 2);
    let roles = serde_json::json!({
        "ROMEO": long("ab"),
        "JULIET": format!("{}{}", long("c"), "z".repeat(min / 20)),
        "NURSE": "too short",
    });
    std::fs::write(root.join(SHAKESPEARE_ROLES_FILE), roles.to_string()).unwrap();
    let split = load_shakespeare_roles(&dir).unwrap();
    // NURSE is left out; JULIET 0, ROMEO 1 (sorted by name).
    let owners: std::collections::BTreeSet<u32> = split.train.owners.iter().copied().collect();
    assert_eq!(owners.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(split.train.owners.len(), split.train.len());
    // JULIET's held-out end is all z, a character her training text never
    // has: the test split is cut off by position, not sampled.
    assert!(
        split.train.vocab_size < 6,
        "PAD, UNK, a, b, c (z only in the end)"
    );
    let juliet_test = (0..split.test.len())
        .filter(|&i| split.test.example(i).contains(&(UNK as f32)))
        .count();
    assert!(juliet_test > 0);
    // Windows are SHAKESPEARE_SEQ_LEN long, the label follows them.
    assert_eq!(split.train.example_len(), SHAKESPEARE_SEQ_LEN);
    let first_romeo = split.train.owners.iter().position(|&o| o == 1).unwrap();
    let x = split.train.example(first_romeo);
    assert_ne!(x[0], x[1], "abab...");
    assert_eq!(
        split.train.labels[first_romeo] as f32,
        x[SHAKESPEARE_SEQ_LEN - 2]
    );

    std::fs::write(root.join(SHAKESPEARE_ROLES_FILE), "{\"ROMEO\":\n 3}").unwrap();
    let err = load_shakespeare_roles(&dir).unwrap_err().to_string();
    assert!(err.contains("by_play_and_character.json:2:"), "{err}");
    std::fs::write(root.join(SHAKESPEARE_ROLES_FILE), "{\"NURSE\": \"short\"}").unwrap();
    let err = load_shakespeare_roles(&dir).unwrap_err().to_string();
    assert!(err.contains("no role has"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn real_data() -> Option<PathBuf> {
    std::env::var_os(super::super::DATA_DIR_ENV)
        .map(PathBuf::from)
        .filter(|d| d.join(SST2_DIR).exists())
}

#[test]
fn real_text_datasets_when_available() {
    let Some(dir) = real_data() else {
        eprintln!("FEDVEIL_DATA has no text datasets; skipping");
        return;
    };
    let sst2 = load_sst2(&dir).unwrap();
    assert_eq!((sst2.train.len(), sst2.test.len()), (67_349, 872));
    let ag = load_ag_news(&dir).unwrap();
    assert_eq!((ag.train.len(), ag.test.len()), (10_001, 7_600));
    assert_eq!(ag.test.class_counts(), vec![1900; 4]);
    let leaf = load_leaf_shakespeare(&dir).unwrap();
    assert_eq!((leaf.train.len(), leaf.test.len()), (41_990, 3_881));
    let roles: std::collections::BTreeSet<u32> = leaf.train.owners.iter().copied().collect();
    assert_eq!(roles.len(), 10);
    let roles = load_shakespeare_roles(&dir).unwrap();
    let owners: std::collections::BTreeSet<u32> = roles.train.owners.iter().copied().collect();
    eprintln!(
        "shakespeare-roles: {} roles, {} train / {} test windows, vocabulary {}",
        owners.len(),
        roles.train.len(),
        roles.test.len(),
        roles.train.vocab_size
    );
    assert!(owners.len() > 100, "{} roles", owners.len());
    let tiny = load_tiny_shakespeare(&dir).unwrap();
    assert_eq!(tiny.train.vocab_size, 65 + 2);
}
